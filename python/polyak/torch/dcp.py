"""The EMA's shadows as tensors over the library's own memory (no copy), and its state in the
form torch.distributed.checkpoint (DCP) saves in parallel, loads in place and reshards.

The rules (docs/shadow-views.md): a view is a DLPack tensor over one rank's piece of one
shadow; it keeps the handle's memory alive (EMA.close() then refuses every call, and the memory
goes with the last view); loads copy into the same memory, so views stay valid; writes through
views are for loads in place, bracketed by the library's polyak_begin_shadow_write and
polyak_set_step_state, which checks the step state the state carries beside the shadows.

The state (dcp_state_dict): {"shadows": [{name: tensor} per shadow], "copies": {name: tensor},
"step_state": int64 tensor, "settings": str}, every tensor logical (row-major shape):
- unsharded: plain tensors over the shadows;
- FSDP2: DTensors with the params' placements over each rank's shard;
- shard=True: DTensors whose local tensor describes its flat element range as the row-major
  boxes that tile it (DCP's chunk protocol: __create_chunk_list__, __create_write_items__,
  __get_tensor_shard__, which DTensor hands to its local tensor), each box a view.
So one checkpoint loads at any world size, into any of the three."""
import json
import re
import struct
import weakref

import torch

from polyak import FormatError, InvalidArgError, MismatchError, StateError, UnsupportedError

from ._tensors import _is_dtensor, _local

_OPEN_MESSAGE = ("the shadows are being written in place (a load that has not finished, or failed half-way) and may "
                "hold part of a state; load a checkpoint first (dcp.load, load_state_dict or load)")


_DCP_TORCH = (2, 5)  # public torch.distributed.tensor, DeviceMesh.from_group, DTensor passing DCP's chunk protocol


def _require_dcp_torch(what):
    """polyak.UnsupportedError naming the minimum on a torch older than the DCP route needs."""
    found = re.match(r"(\d+)\.(\d+)", str(torch.__version__))
    if found and (int(found[1]), int(found[2])) < _DCP_TORCH:
        raise UnsupportedError(f"{what} needs torch >= {_DCP_TORCH[0]}.{_DCP_TORCH[1]} (public "
                               "torch.distributed.tensor, DeviceMesh.from_group, DCP's chunk protocol through "
                               f"DTensor; FSDP2's fully_shard from 2.6); this is torch {torch.__version__}. "
                               "ema.save / ema.state_dict() work on older torch")


def _refuse_open(ema, what):
    """polyak.StateError if the EMA's shadows are open for writing (what the library's saves refuse)."""
    if ema._handle.step_state()["shadows_open"]:
        raise StateError(f"{what}: {_OPEN_MESSAGE}")


def _view(handle, shadow, s):
    """This rank's piece of shadow `shadow` of registered tensor s: one flat tensor over the
    library's memory (a DLPack view that keeps it alive)."""
    return torch.from_dlpack(handle.shadow_capsule(shadow, s.info.index))


def _boxes(shape, first, count):
    """The row-major boxes (offsets, sizes, start) that tile elements [first, first + count) of
    a row-major tensor of `shape`, in order; start is the box's first element, flat. Each box's
    elements are contiguous: within one row of the dimension it splits, or whole rows."""
    out = []

    def split(dim, prefix, lo, hi):  # elements [lo, hi) of the sub-tensor shape[dim:] at prefix
        if lo >= hi:
            return
        rest = shape[dim + 1:]
        inner = 1
        for d in rest:
            inner *= d
        base = sum(p * stride for p, stride in zip(prefix, _strides(shape)))
        if lo % inner == 0 and hi % inner == 0:
            out.append((tuple(prefix) + (lo // inner,) + (0,) * len(rest),
                        (1,) * len(prefix) + ((hi - lo) // inner,) + tuple(rest), base + lo))
            return
        if lo % inner:  # the head: part of one row
            row = lo // inner
            end = min(hi, (row + 1) * inner)
            split(dim + 1, prefix + [row], lo - row * inner, end - row * inner)
            lo = end
        whole = hi // inner * inner
        if lo < whole:  # whole rows
            split(dim, prefix, lo, whole)
            lo = whole
        if lo < hi:  # the tail: the start of one row
            row = lo // inner
            split(dim + 1, prefix + [row], 0, hi - row * inner)

    if count:
        if len(shape) == 0:
            out.append(((), (), 0))
        else:
            split(0, [], first, first + count)
    return out


def _strides(shape):
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= d
    return strides[::-1]


class _Boxes(torch.Tensor):
    """A rank's flat piece of a sharded shadow (memory order), which DCP sees as the boxes of
    the logical tensor that tile it. `_polyak_boxes`: (logical offsets, logical sizes, start in
    the piece, memory-order sizes) per box; `_polyak_perm`: the memory order, or None. Plain
    data only: DCP's async staging copies the tensor with its attributes."""

    def __create_chunk_list__(self):
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        return [ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(z)) for o, z, _, _ in self._polyak_boxes]

    def __create_write_items__(self, fqn, obj):
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
        from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
        properties = TensorProperties(dtype=self.dtype)
        size = torch.Size(obj.shape)
        return [WriteItem(index=MetadataIndex(fqn, torch.Size(o), i), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets=torch.Size(o),
                                                                                 sizes=torch.Size(z)),
                                                      properties=properties, size=size))
                for i, (o, z, _, _) in enumerate(self._polyak_boxes)]

    def __get_tensor_shard__(self, index):
        flat = self.as_subclass(torch.Tensor)
        for offsets, _, start, memory_sizes in self._polyak_boxes:
            if torch.Size(offsets) == index.offset:
                box = flat[start:start + _numel(memory_sizes)].view(memory_sizes)
                perm = self._polyak_perm
                return box if perm is None else box.permute(_inverse(perm))
        raise ValueError(f"polyak: no box at {tuple(index.offset)} of {index.fqn} on this rank")


def _numel(sizes):
    n = 1
    for d in sizes:
        n *= d
    return n


def _inverse(perm):
    inverse = [0] * len(perm)
    for j, d in enumerate(perm):
        inverse[d] = j
    return tuple(inverse)


class _StepState(torch.Tensor):
    """The step state beside the shadows (int64: step, the ranks' non-finite count, each
    shadow's update count, then each shadow's beta product as its float64 bits). DCP asks a
    tensor it loads into for its chunks first, before it writes anything: here that opens the
    EMA's shadows for writing (polyak_begin_shadow_write), so a load that fails half-way leaves
    the EMA refusing updates until a load succeeds. DCP asks a tensor it saves for its write
    items (only when saving): refused while the shadows are open, as the library's saves are.
    `_polyak_target`: a weak reference to the EMA (None once it is gone)."""

    def _polyak_ema(self):
        ref = self.__dict__.get("_polyak_target")
        ema = ref() if isinstance(ref, weakref.ref) else None
        return ema if ema is not None and ema._handle is not None and not ema._handle.closed else None

    def __create_chunk_list__(self):
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        ema = self._polyak_ema()
        if ema is not None:
            ema._handle.begin_shadow_write()
        return [ChunkStorageMetadata(offsets=torch.Size([0]), sizes=self.size())]

    def __create_write_items__(self, fqn, obj):
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
        from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
        ema = self._polyak_ema()
        if ema is not None:
            _refuse_open(ema, "saving the EMA's state")
        return [WriteItem(index=MetadataIndex(fqn, torch.Size([0])), type=WriteItemType.TENSOR,
                          tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets=torch.Size([0]),
                                                                                 sizes=obj.size()),
                                                      properties=TensorProperties(dtype=obj.dtype), size=obj.size()))]

    def __get_tensor_shard__(self, index):  # a plain tensor over the same memory: what DCP writes and reads
        return self.as_subclass(torch.Tensor)


def _pack(state, nonfinite):
    bits = [struct.unpack("<q", struct.pack("<d", b))[0] for b in state["beta_products"]]
    return torch.tensor([state["step"], nonfinite, *state["update_counts"], *bits], dtype=torch.int64)


def _unpack(values, num_shadows):
    values = [int(v) for v in values.tolist()]
    products = [struct.unpack("<d", struct.pack("<q", b))[0] for b in values[2 + num_shadows:]]
    return {"step": values[0], "nonfinite_count": values[1], "update_counts": values[2:2 + num_shadows],
            "beta_products": products}


def _check_step_state(values, num_shadows):
    """What polyak_set_step_state checks (views.c), checked before any shadow is written, so a
    state it would refuse changes nothing: polyak.InvalidArgError naming the value."""
    def fail(what):
        raise InvalidArgError(f"the state's step_state: {what}")
    step, count = values["step"], values["nonfinite_count"]
    if len(values["beta_products"]) != num_shadows or len(values["update_counts"]) != num_shadows:
        fail(f"not {num_shadows} shadows")
    if step < 0:
        fail(f"step {step} is not a step")
    if count < 0:
        fail(f"nonfinite_count {count} is not a count")
    for k, (product, updates) in enumerate(zip(values["beta_products"], values["update_counts"])):
        if not 0.0 <= product <= 1.0:  # NaN fails too
            fail(f"beta_products[{k}] = {product!r} is not in [0, 1]")
        if not 0 <= updates <= step:
            fail(f"update_counts[{k}] = {updates} is not a count of updates up to step {step}")


def _count_group(mesh, placements, world_size):
    """The group over which the ranks' non-finite counts are summed, for params of these
    placements on `mesh`: each shard counted once. One sharded dimension: its group (HSDP's
    replicas left out); every dimension sharded over the whole world: that world; none: None
    (each rank's count is the replicas' one). Else polyak.UnsupportedError."""
    import torch.distributed as dist
    sharded = [d for d, p in enumerate(placements) if p.is_shard()]
    if not sharded:
        return None
    if len(sharded) == 1:
        return mesh.get_group(sharded[0]) if mesh.ndim > 1 else mesh.get_group()
    if len(sharded) == mesh.ndim and mesh.size() == world_size:
        return dist.group.WORLD
    raise UnsupportedError(f"the EMA's DCP state for params placed {tuple(placements)} on a {mesh.ndim}-D mesh: "
                           "sharded over one dimension (FSDP2, HSDP) or over the whole world")


class _DCPState:
    """ema.dcp: the EMA as DCP's Stateful (state_dict() / load_state_dict()), for
    dcp.save({"ema": ema.dcp, ...}) and dcp.load(...) whatever the EMA's kind."""

    def __init__(self, ema):
        self._ema = ema

    def state_dict(self):
        return self._ema.dcp_state_dict()

    def load_state_dict(self, state):
        self._ema.load_state_dict(state)


class _Views:
    """EMA's views of its shadows and its DCP state (a part of polyak.torch.EMA)."""

    def shadow_views(self, shadow: int = 0):
        """{name: tensor} of every averaged tensor's shadow `shadow` (the average as stored: the
        shadow dtype, no debias) and every copied buffer's value at the last update, each a view
        of the library's memory (no copy), shaped and strided as the model's tensor (DTensors
        with its placements under FSDP2), under every name the model has it. Read-only by rule:
        an update changes them in place; a write needs begin_shadow_write ... set_step_state
        (docs/shadow-views.md). Refused (polyak.UnsupportedError) where no such view exists:
        zero_init (the stored shadow is not the average until debiased) and shard=True (a rank
        holds a flat slice)."""
        self._check_open()
        h = self._handle
        if not 0 <= shadow < h.num_shadows:
            raise InvalidArgError(f"shadow {shadow} of {h.num_shadows}")
        if h.config.zero_init:
            raise UnsupportedError("shadow_views with zero_init: the stored shadows are divided by 1 - prod(beta) "
                                   "when read; model_state_dict() gives the averages")
        if self._sharded():
            raise UnsupportedError("shadow_views of a sharded EMA (shard=True): each rank holds a flat slice of "
                                   "every shadow; model_state_dict() gathers them, dcp_state_dict() presents them")
        out = {}
        for s in self._averaged + self._copied:
            value = self._as_model_tensor(s, self._whole_view(s, 0 if s in self._copied else shadow))
            out.update((name, value) for name in s.names)
        return out

    def _whole_view(self, s, shadow):
        return s.logical_view(_view(self._handle, shadow, s).view(s.shape))

    def _box_view(self, s, shadow):
        """Sharded: this rank's piece of tensor s as a DTensor of its logical shape whose local
        tensor is the piece, presented to DCP as boxes."""
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import DTensor, Shard
        flat = _view(self._handle, shadow, s)
        first, count = s.info.local_range
        boxes = []
        for offsets, sizes, start in _boxes(tuple(s.shape), first, count):
            if s.perm is not None:  # a box in memory order is a box of the logical tensor too
                inverse = _inverse(s.perm)
                logical = tuple(offsets[j] for j in inverse), tuple(sizes[j] for j in inverse)
            else:
                logical = offsets, sizes
            boxes.append((logical[0], logical[1], start - first, sizes))
        if self._mesh is None:
            import torch.distributed as dist
            group = self._group if self._group is not None else dist.group.WORLD
            self._mesh = DeviceMesh.from_group(group, self.device.type)
        shape = s.logical_shape
        out = DTensor.from_local(flat.as_subclass(_Boxes), self._mesh, [Shard(0)], run_check=False, shape=shape,
                                 stride=torch.Size(_strides(tuple(shape))))
        local = out._local_tensor  # what DCP asks (from_local may hold a new alias of the piece)
        local._polyak_boxes = boxes
        local._polyak_perm = s.perm
        return out

    def _settings(self):
        """What must agree for a state to continue here: every shadow's settings, the shadow
        dtype and the modes, as text (the checkpoint metadata's counterpart)."""
        cfg = self._handle.config
        shadows = []
        for k in range(self._handle.num_shadows):
            c = cfg.shadows[k]
            sched = c.schedule
            shadows.append([sched.kind, float(sched.beta).hex(), float(sched.beta_min).hex(),
                            float(sched.inv_gamma).hex(), float(sched.power).hex(), float(sched.gamma).hex(),
                            sched.ramp_steps, sched.start_step, c.rounding, c.count_updates,
                            float(c.grad_norm_c).hex(), float(c.layerwise_beta0).hex()])
        return json.dumps({"format": "polyak-dcp-1", "shadows": shadows, "shadow_dtype": self._handle.shadow_dtype,
                           "zero_init": cfg.zero_init, "skip_nonfinite": cfg.skip_nonfinite, "seed": cfg.seed,
                           "lookahead_every": cfg.lookahead_every}, separators=(",", ":"))

    def _distributed(self):
        """The process group the ranks' counts are summed over: a sharded EMA's, under FSDP2 the
        params' sharding dimension of their mesh (not the replicas of HSDP, which count the same
        shard again); None for one process."""
        import torch.distributed as dist
        if self._sharded():
            return self._group if self._group is not None else dist.group.WORLD
        if self._dtensor_params() and dist.is_initialized():
            t = self._averaged[0].tensor
            return _count_group(t.device_mesh, t.placements, dist.get_world_size())
        return None

    def dcp_state_dict(self):
        """The state for torch.distributed.checkpoint, over the library's memory (no copy):
        {"shadows": [{name: tensor} per shadow], "copies": {name: tensor}, "step_state": int64
        tensor, "settings": str}. The tensors are logical: plain views (unsharded), DTensors
        with the params' placements (FSDP2), or DTensors presenting a rank's flat slice as the
        boxes that tile it (shard=True); one checkpoint loads at any world size into any of
        them. Collective where the EMA spans ranks (the ranks' non-finite counts are summed).
        dcp.load into it writes the shadows in place; load_state_dict(state) then sets the
        step state (checked by the library). docs/shadow-views.md. Needs torch >= 2.5."""
        _require_dcp_torch("dcp_state_dict")
        self._check_open()
        h = self._handle
        state = h.step_state()
        count = state["nonfinite_count"]
        group = self._distributed()
        if group is not None:
            import torch.distributed as dist
            total = torch.tensor([count], dtype=torch.int64)
            dist.all_reduce(total, group=group)
            count = int(total)
        marker = _pack(state, count).as_subclass(_StepState)
        marker._polyak_target = weakref.ref(self)
        shadows = []
        for k in range(h.num_shadows):
            if self._sharded():
                shadows.append({s.name: self._box_view(s, k) for s in self._averaged})
            else:
                shadows.append({s.name: self._as_model_tensor(s, self._whole_view(s, k)) for s in self._averaged})
        copies = {s.name: self._whole_view(s, 0) for s in self._copied}
        return {"shadows": shadows, "copies": copies, "step_state": marker, "settings": self._settings()}

    @property
    def dcp(self):
        """This EMA as torch.distributed.checkpoint's Stateful: dcp.save({"model": ..., "ema":
        ema.dcp}, checkpoint_id=...) and dcp.load the same dict (which calls load_state_dict).
        Needs torch >= 2.5."""
        _require_dcp_torch("ema.dcp")
        return _DCPState(self)

    # ---- loading -----------------------------------------------------------------------
    def _load_dcp_state(self, state):
        """load_state_dict of a dcp_state_dict() form: the shadows from its tensors (in place
        when they are this EMA's own views, which dcp.load wrote; else checked, then copied),
        then the step state through the library's check (its checks made first here too, so a
        refused state copies nothing). A mismatch found after dcp.load wrote the shadows leaves
        the EMA refusing updates until a load succeeds."""
        _require_dcp_torch("load_state_dict of a DCP state")
        h = self._handle
        settings = state.get("settings")
        if settings != self._settings():
            raise MismatchError(f"the state's settings are {settings!r}; this EMA's {self._settings()!r} (schedules, "
                                "shadow dtype, seed and modes must agree)")
        shadows, copies = state.get("shadows"), state.get("copies", {})
        if not isinstance(shadows, (list, tuple)) or len(shadows) != h.num_shadows:
            raise MismatchError(f"the state has {len(shadows) if isinstance(shadows, (list, tuple)) else 'no'} "
                                f"shadows, this EMA {h.num_shadows}")
        writes = []  # (destination view, source): the copies a state from elsewhere needs
        for k, values in enumerate(shadows):
            names = {s.name for s in self._averaged}
            if set(values) != names:
                extra, lacking = sorted(set(values) - names), sorted(names - set(values))
                raise MismatchError(f"the state's shadow {k} " + (f"has {extra[0]!r}, which this EMA does not average"
                                                                   if extra else f"lacks {lacking[0]!r}"))
            for s in self._averaged:
                writes += self._planned_write(s, k, values[s.name], self.shadow_dtype)
        if set(copies) != {s.name for s in self._copied}:
            raise MismatchError(f"the state copies {sorted(copies)}, this EMA {sorted(s.name for s in self._copied)}")
        for s in self._copied:
            writes += self._planned_write(s, 0, copies[s.name], s.dtype)
        marker = state.get("step_state")
        if not isinstance(marker, torch.Tensor) or marker.dtype != torch.int64 or \
                tuple(marker.shape) != (2 + 2 * h.num_shadows,):
            raise FormatError(f"the state's step_state is not {2 + 2 * h.num_shadows} int64 values")
        values = _unpack(marker.detach().cpu(), h.num_shadows)
        if self._distributed() is not None:
            import torch.distributed as dist
            if dist.get_rank(self._distributed()) != 0:
                values["nonfinite_count"] = 0  # rank 0 carries the ranks' total
        _check_step_state(values, h.num_shadows)  # before a shadow is written: a refused state changes nothing
        if writes:
            h.begin_shadow_write()
            with torch.no_grad():
                for dst, src in writes:
                    dst.copy_(src)
        h.set_step_state(**values)
        self._last_step = 0

    def _planned_write(self, s, shadow, value, dtype):
        """[] if `value` is this EMA's own view of shadow `shadow` of s (a load in place wrote
        it), else [(view, source)] after checking its shape and dtype."""
        if not isinstance(value, torch.Tensor):
            raise MismatchError(f"the state's {s.name!r} (shadow {shadow}) is {type(value).__name__}, not a tensor")
        address, _, num_elems = self._handle.shadow_data(shadow, s.info.index)
        local = _local(value)
        if num_elems == 0 or local.data_ptr() == address and local.dtype == dtype:
            return []
        if isinstance(local, _Boxes):
            raise UnsupportedError(f"the state's {s.name!r} is another sharded EMA's slice: load its checkpoint "
                                   "with dcp.load instead")
        if value.dtype != dtype:
            raise MismatchError(f"the state's {s.name!r} (shadow {shadow}) is {value.dtype}; this EMA keeps {dtype}")
        if self._sharded():
            whole = value.full_tensor() if _is_dtensor(value) else value
            if tuple(whole.shape) != tuple(s.logical_shape):
                raise MismatchError(f"the state's {s.name!r} (shadow {shadow}) is {tuple(whole.shape)}; this EMA "
                                    f"keeps {tuple(s.logical_shape)}")
            first, count = s.info.local_range
            flat = _view(self._handle, shadow, s)
            return [(flat, s.to_memory(whole.detach().to(self.device)).reshape(-1)[first:first + count])]
        view = self._whole_view(s, shadow)
        if tuple(local.shape) != tuple(view.shape):
            raise MismatchError(f"the state's {s.name!r} (shadow {shadow}) is {tuple(local.shape)}; this EMA keeps "
                                f"{tuple(view.shape)}")
        return [(view, local.detach())]
