"""polyak.torch: averaged weights of a PyTorch model, every shadow updated by one C call.

    from polyak.torch import EMA
    ema = EMA(model, decay=0.9999, warmup=True)
    for step in range(1, num_steps + 1):
        ...; opt.step()
        ema.update(step)                    # enqueued on torch's current stream; no host sync
    with ema.average_parameters():          # the params are the average inside, as they were after
        evaluate(model)
    ema.save("ema.safetensors")             # safetensors.torch.load_file gives the averaged weights

The library reads the params where they live (CPU memory or a CUDA device)
through their data pointers; nothing here computes an average. Buffers: the
f32/bf16/f16 ones (BatchNorm's running statistics) are averaged like params by
default, the others (num_batches_tracked, float64 ones) registered as the
library's copy-only tensors, mirrored by the same update call; buffers="copy"
copies all of them, "ignore" leaves them out.
"""
import contextlib
import json
import weakref
from typing import Optional, Sequence

import torch

import polyak
from polyak import (Constant, FormatError, InvalidArgError, MismatchError, Schedule, StateError,
                    UnsupportedError, Warmup)
from polyak._lib import lib as _c

__all__ = ["EMA"]

_DTYPE_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}  # averaged
_COPY_DTYPE_NAMES = {**_DTYPE_NAMES, torch.float64: "f64", torch.int64: "i64", torch.int32: "i32",
                     torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8", torch.bool: "bool"}  # copied
_TORCH_DTYPES = {name: dtype for dtype, name in _COPY_DTYPE_NAMES.items()}
_data_ptr = torch.Tensor.data_ptr


def _is_dtensor(t):
    return type(t).__name__ == "DTensor" or hasattr(t, "_local_tensor") and hasattr(t, "placements")


def _local(t):
    """The tensor whose memory this rank holds: a DTensor's local shard, else t itself."""
    return t.to_local() if _is_dtensor(t) else t


def _checkpoint_of(handle):
    """The handle's checkpoint (polyak_save_to_memory) as a uint8 CPU tensor."""
    out = torch.empty(handle.save_size(), dtype=torch.uint8)
    return out[:handle.save_to_memory(_data_ptr(out), dst_num_bytes=out.numel())]


def _split(checkpoint):
    """(header, data) of a checkpoint: the safetensors container only (an 8-byte length, then the
    JSON header, then the data, which stays the library's)."""
    header_bytes = int.from_bytes(checkpoint[:8].numpy().tobytes(), "little")
    return json.loads(checkpoint[8:8 + header_bytes].numpy().tobytes()), checkpoint[8 + header_bytes:]


def _join(header, data):
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    head = torch.frombuffer(bytearray(len(text).to_bytes(8, "little") + text), dtype=torch.uint8)
    return torch.cat([head, data])


def _entry(header, data, name, dtype):
    """The tensor saved under `name`, as `dtype`: a copy of its bytes."""
    begin, end = header[name]["data_offsets"]
    return data[begin:end].clone().view(dtype).reshape(header[name]["shape"])


def _saved_name(shadow, name):
    return name if shadow == 0 else f"polyak.shadow.{shadow}.{name}"


class _Source:
    """One registered tensor: where it lives in the model and the memory the library reads; what
    the library registered (its number, shape, dtype, this rank's slice) is `info`."""
    __slots__ = ("name", "module", "attr", "kind", "tensor", "local", "alias", "ptr", "info")

    def __init__(self, name, module, attr, kind, tensor):
        self.name, self.module, self.attr, self.kind, self.tensor = name, module, attr, kind, tensor
        self.local = tensor._local_tensor if _is_dtensor(tensor) else tensor
        # a second reference to the memory: a re-allocated param leaves the library reading
        # valid (if stale) memory until the check below refuses the update
        self.alias = self.local.detach()
        self.ptr = _data_ptr(self.local)
        self.info = None  # polyak.TensorInfo, once registered

    @property
    def shape(self):  # as registered, whatever became of the tensor since
        return torch.Size(self.info.shape)

    @property
    def dtype(self):
        return _TORCH_DTYPES[self.info.dtype]


class EMA:
    """Averages of a model's params (and buffers) kept by libpolyak.

    decay, warmup: one shadow, Constant(decay) or, with warmup, timm's warm-up
    schedule Warmup(beta=decay); `schedules` instead gives up to 8 shadows of
    any polyak schedule (Constant, TF, Warmup, Linear, Cosine, Equal, Power,
    GradNorm, Layerwise, and Lookahead last), all updated by one call.
    start_step and rounding apply to decay/warmup (schedules carry their own):
    beta is 0 (the shadow copies the params) up to start_step; rounding
    "stochastic" rounds the f32 shadow stochastically (long horizons: beta >=
    0.9999). shadow_dtype: torch.float32 (default) or torch.bfloat16
    (stochastic rounding). buffers: "average" (f32, bf16 and f16 ones averaged,
    the others copied), "copy" (all copied) or "ignore"; a copied buffer is the
    library's copy-only tensor: mirrored by every update in the same call,
    written back with the average, saved in checkpoints. shard: with DDP, True
    (the default process group) or a group: each rank keeps 1/W of every
    shadow; reads gather with torch.distributed. check_stale: before every
    update, check that no registered param was re-allocated (measured cost:
    README); False skips that. cpu_threads: on the CPU, the library's
    threads per call (updates, read-outs, copies), this one's included: 1
    (the default) runs on the caller alone, 0 one per core this process may
    run on, N > 1 starts N - 1 workers held until close(); the same bits
    for every count (docs/cpu-threads.md). A CUDA EMA ignores it.

    The params must be contiguous, on one device (CPU or one CUDA device),
    f32, bf16 or f16. Every call raises a polyak.PolyakError subclass on
    failure and then has changed nothing.
    """

    def __init__(self, model: torch.nn.Module, decay: Optional[float] = None, warmup: bool = False, *,
                 schedules: Optional[Sequence[Schedule]] = None, start_step: int = 0, rounding: str = "nearest",
                 shadow_dtype=torch.float32, buffers: str = "average", zero_init: bool = False,
                 skip_nonfinite: bool = True, seed: int = 0, shard=None, check_stale: bool = True,
                 cpu_threads: int = 1):
        self._handle = None
        self._hooks = []
        if not isinstance(model, torch.nn.Module):
            raise InvalidArgError(f"EMA needs a torch.nn.Module, got {type(model).__name__}")
        if schedules is None:
            decay = 0.9999 if decay is None else decay
            schedules = [Warmup(beta=decay, start_step=start_step, rounding=rounding) if warmup else
                         Constant(decay, start_step=start_step, rounding=rounding)]
        elif decay is not None or warmup or start_step or rounding != "nearest":
            raise InvalidArgError("give either schedules or decay/warmup/start_step/rounding, not both")
        if buffers not in ("average", "copy", "ignore"):
            raise InvalidArgError(f"buffers={buffers!r}: one of 'average', 'copy', 'ignore'")
        if shadow_dtype not in (torch.float32, torch.bfloat16):
            raise InvalidArgError(f"shadow_dtype {shadow_dtype}: torch.float32 or torch.bfloat16")
        self._check_stale = bool(check_stale)
        self._swapped_in = None  # what the params hold inside average_parameters / posthoc_parameters
        self._only_steps = None  # (every, offset): update(step) acts where step % every == offset
        self._copy_at_step = None  # after the update at this step, shadows <- params (a copy)

        averaged, copied = self._collect(model, buffers)
        tensors = [s.local for s in averaged + copied]
        devices = {t.device for t in tensors}
        if len(devices) > 1:
            raise InvalidArgError(f"the model's tensors are on several devices ({sorted(map(str, devices))}): "
                                  "one EMA averages the tensors of one device")
        self.device = devices.pop() if devices else torch.device("cpu")
        if self.device.type not in ("cpu", "cuda"):
            raise UnsupportedError(f"tensors on {self.device}: polyak runs on the CPU and CUDA devices")
        for s in averaged:
            if s.local.dtype not in _DTYPE_NAMES:
                raise UnsupportedError(f"{s.kind} {s.name!r} is {s.local.dtype}: polyak averages float32, "
                                       "bfloat16 and float16 tensors")
        for s in copied:
            if s.local.dtype not in _COPY_DTYPE_NAMES:
                raise UnsupportedError(f"buffer {s.name!r} is {s.local.dtype}, which polyak does not copy "
                                       "(buffers='ignore' leaves buffers out)")
        for s in averaged + copied:
            if not s.local.is_contiguous():
                raise InvalidArgError(f"{s.kind} {s.name!r} is not contiguous (strides {s.local.stride()}): "
                                      "polyak reads params as contiguous memory")

        self._group = None
        world_size, rank = 1, 0
        if shard is not None and shard is not False:
            import torch.distributed as dist
            if not dist.is_initialized():
                raise StateError("shard needs torch.distributed initialized (init_process_group)")
            self._group = None if shard is True else shard
            world_size, rank = dist.get_world_size(self._group), dist.get_rank(self._group)
            if any(s.count_updates for s in schedules) or zero_init:
                raise UnsupportedError("shard: count_updates and zero_init need whole shadows on a rank")
        self._cuda = self.device.type == "cuda"
        self._device_index = self.device.index if self._cuda else None
        if self._cuda and self._device_index is None:
            self._device_index = torch.cuda.current_device()
        handle = polyak.Handle(schedules, backend="cuda" if self._cuda else "cpu",
                               device=self._device_index or 0, shadow_dtype=_DTYPE_NAMES[shadow_dtype],
                               zero_init=zero_init, skip_nonfinite=skip_nonfinite, seed=seed,
                               world_size=world_size, rank=rank, cpu_threads=cpu_threads)
        try:
            for s in averaged:
                handle.add(s.name, _data_ptr(s.local), _DTYPE_NAMES[s.local.dtype], s.local.shape)
            for s in copied:
                handle.add_copy(s.name, _data_ptr(s.local), _COPY_DTYPE_NAMES[s.local.dtype], s.local.shape)
            handle.finalize(self._stream())
            for s in averaged + copied:
                s.info = handle.tensor_info(handle.find_tensor(s.name))
        except BaseException:
            handle.close()
            raise
        self._handle = handle
        self.schedules = tuple(schedules)
        self.shadow_dtype = shadow_dtype
        self._averaged = averaged
        self._copied = copied
        self._sources = [s.local for s in averaged + copied]
        self._ptrs = tuple(s.ptr for s in averaged + copied)
        self._stale = None
        self._watch(averaged + copied)
        self._grad_norm = None  # keeps the borrowed tensors alive
        self._grads = None
        if world_size > 1:
            self._ranges = self._all_ranges()

    # ---- registration ---------------------------------------------------------------
    @staticmethod
    def _collect(model, buffers):
        owners = {}
        for module_name, module in model.named_modules():
            for attr, p in module._parameters.items():
                if p is not None:
                    owners.setdefault(id(p), (module, attr))
            for attr, b in module._buffers.items():
                if b is not None:
                    owners.setdefault(id(b), (module, attr))
        averaged, copied = [], []
        for name, p in model.named_parameters():
            averaged.append(_Source(name, *owners[id(p)], "param", p))
        if buffers != "ignore":
            for name, b in model.named_buffers():
                source = _Source(name, *owners[id(b)], "buffer", b)
                (averaged if buffers == "average" and b.dtype in _DTYPE_NAMES else copied).append(source)
        return averaged, copied

    def _watch(self, sources):
        """Notices a registered param or buffer replaced in its module (load_state_dict(assign=True),
        a setattr): torch calls these hooks on every registration."""
        watched = {(id(s.module), s.attr): s.name for s in sources}
        me = weakref.ref(self)

        def hook(module, name, value):
            ema = me()
            key = (id(module), name)
            if ema is not None and key in watched and ema._stale is None:
                ema._stale = f"{watched[key]!r} was replaced in its module"
        from torch.nn.modules import module as torch_module
        self._hooks = [torch_module.register_module_parameter_registration_hook(hook),
                       torch_module.register_module_buffer_registration_hook(hook)]

    def _check_open(self):
        """For calls that read only the shadows: fine on a stale registration too."""
        if self._handle is None or self._handle.closed:
            raise StateError("the EMA is closed")

    def _check_live(self):
        """For calls that read or write the params."""
        self._check_open()
        if self._stale is None and self._check_stale and tuple(map(_data_ptr, self._sources)) != self._ptrs:
            moved = [s.name for s, ptr in zip(self._averaged + self._copied, self._ptrs)
                     if _data_ptr(s.local) != ptr]
            self._stale = f"{moved[0]!r} was re-allocated" + (f" (and {len(moved) - 1} more)" if moved[1:] else "")
        if self._stale is not None:
            raise StateError(f"the EMA's registration is stale: {self._stale} after the EMA registered it "
                             "(model.to(), load_state_dict(assign=True), an optimizer that swaps storage?). "
                             "Create the EMA after such changes; the shadows are untouched")

    def _check_not_swapped(self, what):
        if self._swapped_in is not None:
            raise StateError(f"{what} inside {self._swapped_in}: the params hold an average there, not the "
                             "trained weights")

    @contextlib.contextmanager
    def _params_swapped(self, what):
        """Marks the params as holding an average (updates refused) for the body."""
        self._check_live()
        self._check_not_swapped(what)
        self._swapped_in = what
        try:
            yield
        finally:
            self._swapped_in = None

    def _stream(self):
        if not self._cuda:
            return None
        get = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        return get(self._device_index) if get else torch.cuda.current_stream(self._device_index).cuda_stream

    # ---- the hot path ------------------------------------------------------------------
    def update(self, step: int):
        """Folds the current params into every shadow as the average after `step` optimizer steps
        (1 for the first). Enqueued on torch's current stream, with no host sync."""
        if self._only_steps is not None and step % self._only_steps[0] != self._only_steps[1]:
            return
        self._check_live()
        self._check_not_swapped("update")
        h = self._handle
        status = _c.polyak_update(h._ptr, step, self._stream())
        if status:
            polyak._check(status, h._ptr, "polyak_update")
        if step == self._copy_at_step:
            for k in range(h.num_shadows):
                h.hard_update(k, self._stream())

    @property
    def step(self):
        """The step of the last update (0 before any)."""
        return self.handle.step

    @property
    def handle(self):
        """The polyak.Handle underneath: the averaged tensors (`names`, in that order), then the copied
        buffers; handle.find_tensor(name) and handle.tensor_info(i) say which is which."""
        if self._handle is None or self._handle.closed:
            raise StateError("the EMA is closed")
        return self._handle

    @property
    def names(self):
        """The averaged tensors' names, in registration order."""
        return [s.name for s in self._averaged]

    def nonfinite_count(self):
        return self.handle.nonfinite_count()

    def close(self):
        """Frees the shadows. Later calls raise polyak.StateError."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._handle is not None:
            self._handle.close()

    def __del__(self):
        for hook in getattr(self, "_hooks", []):
            hook.remove()

    # ---- reading the averages ----------------------------------------------------------
    def _sharded(self):
        return self._handle.world_size > 1

    def _all_ranges(self):
        import torch.distributed as dist
        local = [s.info.local_range for s in self._averaged]
        ranges = [None] * dist.get_world_size(self._group)
        dist.all_gather_object(ranges, local, group=self._group)
        return ranges  # [rank][tensor] = (first_elem, num_elems)

    def _gathered(self, shadow):
        """Every averaged tensor's shadow `shadow` whole, in the shadow dtype, gathered from the
        ranks' slices with torch.distributed (sharded EMAs)."""
        import torch.distributed as dist
        h, dtype = self._handle, self.shadow_dtype
        mine = self._ranges[h.rank]
        flat = torch.empty(sum(n for _, n in mine), dtype=dtype, device=self.device)
        offset = 0
        for s, (_, count) in zip(self._averaged, mine):
            if count:
                h.get_local_shadow(shadow, s.info.index, _data_ptr(flat) + offset * flat.element_size(),
                                   _DTYPE_NAMES[dtype], self._stream(), dst_num_bytes=count * flat.element_size())
            offset += count
        longest = max(sum(n for _, n in r) for r in self._ranges)
        padded = torch.zeros(longest, dtype=dtype, device=self.device)
        padded[:flat.numel()] = flat
        pieces = [torch.empty_like(padded) for _ in self._ranges]
        dist.all_gather(pieces, padded, group=self._group)
        out = [torch.empty(s.shape.numel(), dtype=dtype, device=self.device) for s in self._averaged]
        for rank, ranges in enumerate(self._ranges):
            offset = 0
            for i, (first, count) in enumerate(ranges):
                out[i][first:first + count] = pieces[rank][offset:offset + count]
                offset += count
        return [t.view(s.shape) for t, s in zip(out, self._averaged)]

    def _read(self, shadow, s, dtype):
        """Shadow `shadow` of averaged tensor s in a new tensor of its registered shape, as dtype."""
        out = torch.empty(s.shape, dtype=dtype, device=self.device)
        self.handle.get_shadow(shadow, s.info.index, _data_ptr(out), _DTYPE_NAMES[dtype], self._stream(),
                               dst_num_bytes=out.numel() * out.element_size())
        return out

    def _read_copy(self, j, dst=None):
        """Copied buffer j as of the last update (its mirror), into dst or a new tensor."""
        s = self._copied[j]
        out = torch.empty(s.shape, dtype=s.dtype, device=self.device) if dst is None else dst
        self.handle.get_shadow(0, s.info.index, _data_ptr(out), _COPY_DTYPE_NAMES[s.dtype],
                               self._stream(), dst_num_bytes=out.numel() * out.element_size())
        return out

    def _write_params(self, shadow):
        """The params <- shadow `shadow`, the copied buffers <- their mirrors (sharded: the averages
        gathered, then a torch copy per tensor)."""
        if not self._sharded():
            self._handle.copy_to_params(shadow, self._stream())
            return
        with torch.no_grad():
            for s, value in zip(self._averaged, self._gathered(shadow)):
                s.local.copy_(value)
        for j, s in enumerate(self._copied):
            self._read_copy(j, dst=s.local)

    def model_state_dict(self, shadow: int = 0, dtype: Optional[torch.dtype] = None):
        """The average as the model's state dict: {name: tensor} of every registered param and
        buffer (copied buffers as of the last update), for model.load_state_dict. The averages
        are in each tensor's dtype, or in `dtype` (torch.float32, bfloat16 or float16: say, the
        f32 shadows of a bf16 model exactly). DTensor params give DTensors with the same
        placements."""
        self._check_open()
        if not 0 <= shadow < self._handle.num_shadows:
            raise InvalidArgError(f"shadow {shadow} of {self._handle.num_shadows}")
        if dtype is not None and dtype not in _DTYPE_NAMES:
            raise InvalidArgError(f"dtype {dtype}: averages read out as torch.float32, bfloat16 or float16")
        out = {}
        if self._sharded():
            values = [v.to(dtype or s.dtype) for v, s in zip(self._gathered(shadow), self._averaged)]
        else:
            values = [self._read(shadow, s, dtype or s.dtype) for s in self._averaged]
        for s, value in zip(self._averaged, values):
            out[s.name] = self._as_model_tensor(s, value)
        for j, s in enumerate(self._copied):
            out[s.name] = self._as_model_tensor(s, self._read_copy(j))
        return out

    @staticmethod
    def _as_model_tensor(source, local):
        if not _is_dtensor(source.tensor):
            return local
        from torch.distributed.tensor import DTensor
        t = source.tensor
        return DTensor.from_local(local, t.device_mesh, t.placements, shape=t.shape, stride=t.stride())

    def copy_to(self, model: torch.nn.Module, shadow: int = 0):
        """Writes shadow `shadow` into `model` (another module with the same names and shapes:
        a copy of the trained one kept for evaluation, say), and the copied buffers."""
        values = self.model_state_dict(shadow)
        targets = dict(model.named_parameters())
        targets.update(model.named_buffers())
        missing = [name for name in values if name not in targets]
        if missing:
            raise MismatchError(f"copy_to: the model has no {missing[0]!r}")
        for name, value in values.items():
            if _local(targets[name]).shape != _local(value).shape:
                raise MismatchError(f"copy_to: {name!r} is {tuple(_local(targets[name]).shape)} in the model, "
                                    f"{tuple(_local(value).shape)} here")
        with torch.no_grad():
            for name, value in values.items():
                _local(targets[name]).copy_(_local(value))

    @contextlib.contextmanager
    def average_parameters(self, shadow: int = 0, weights: Optional[Sequence[float]] = None):
        """Inside: the model's params hold shadow `shadow` (or the blend sum_k weights[k] shadow_k)
        and copied buffers their values at the last update; on exit, the exact values they had.
        Updates inside raise polyak.StateError."""
        if weights is not None and self._sharded():
            raise UnsupportedError("blends of sharded shadows: the library blends whole shadows only")
        with self._params_swapped("average_parameters()"):
            yield from self._swap_average(shadow, weights)

    def _swap_average(self, shadow, weights):
        h, stream = self._handle, self._stream()
        h.store(stream)  # the params and the copied buffers, restored bit for bit on exit
        try:
            if weights is not None:
                h.blend_to_params(list(weights), stream=stream)
            else:
                self._write_params(shadow)
            yield self
        finally:
            h.restore(stream)

    # ---- EDM2 post-hoc, adaptive decay ------------------------------------------------
    def snapshot(self, shadow: int) -> torch.Tensor:
        """Shadow `shadow` as one flat float32 tensor on the EMA's device, to stack for synthesis."""
        self._check_open()
        h = self._handle
        out = torch.empty(h.snapshot_elems(), dtype=torch.float32, device=self.device)
        h.snapshot(shadow, _data_ptr(out), self._stream())
        return out

    @contextlib.contextmanager
    def posthoc_parameters(self, snapshots: torch.Tensor, coefficients: Sequence[float]):
        """Inside: the params are sum_i coefficients[i] * snapshots[i] (EDM2's post-hoc average;
        polyak.posthoc_coefficients gives the coefficients); on exit, as they were."""
        with self._params_swapped("posthoc_parameters()"):
            yield from self._swap_posthoc(snapshots, coefficients)

    def _swap_posthoc(self, snapshots, coefficients):
        h, stream = self._handle, self._stream()
        snapshots = snapshots.reshape(len(coefficients), -1)
        if snapshots.device != self.device or snapshots.dtype != torch.float32 or \
                snapshots.shape[1] != h.snapshot_elems():
            raise InvalidArgError(f"snapshots: {len(coefficients)} x {h.snapshot_elems()} float32 on "
                                  f"{self.device}, got {tuple(snapshots.shape)} {snapshots.dtype} on {snapshots.device}")
        snapshots = snapshots.contiguous()
        h.store(stream)
        try:
            h.synthesize_to_params(_data_ptr(snapshots), list(coefficients), stream)
            yield self
        finally:
            h.restore(stream)

    def set_grad_norm(self, grad_norm: torch.Tensor):
        """GradNorm shadows read this one-element float32 tensor (the EMA's device) at every update;
        write the step's norm into it in place (torch.nn.utils.clip_grad_norm_'s result, copied)."""
        if grad_norm.dtype != torch.float32 or grad_norm.numel() != 1 or grad_norm.device != self.device:
            raise InvalidArgError("grad_norm: one float32 element on the EMA's device")
        self.handle.set_grad_norm(_data_ptr(grad_norm))
        self._grad_norm = grad_norm

    def set_grads(self, grads: Optional[Sequence[torch.Tensor]] = None):
        """Layerwise shadows read these gradients (default: each param's .grad) at every update.
        They must stay where they are: zero_grad(set_to_none=False), or call this again."""
        if grads is None:
            grads = [s.tensor.grad for s in self._averaged]
        grads = [None if g is None else _local(g) for g in grads]
        for s, g in zip(self._averaged, grads):
            if g is None or g.shape != s.local.shape or g.dtype != s.local.dtype or not g.is_contiguous() \
                    or g.device != self.device:
                raise InvalidArgError(f"the gradient of {s.name!r} is missing or not like the param")
        if len(grads) != len(self._averaged):
            raise InvalidArgError(f"{len(grads)} gradients for {len(self._averaged)} tensors")
        self.handle.set_grads([_data_ptr(g) for g in grads])
        self._grads = grads

    # ---- CUDA graphs ---------------------------------------------------------------
    def graph_reserve(self, first_step: int, num_steps: int):
        """Reserves steps first_step .. first_step + num_steps - 1 for graph replays: each replay of
        a captured graph_update() applies the next one."""
        self._check_live()
        self._handle.graph_reserve(first_step, num_steps, self._stream())

    def graph_update(self):
        """The update to capture in torch.cuda.graph(...): one kernel node, copied buffers included."""
        self._check_live()
        self._check_not_swapped("graph_update")
        self._handle.graph_update(self._stream())

    def graph_release(self):
        """Ends the reservation (waits for the device); returns the number of steps applied."""
        return self.handle.graph_release()

    # ---- checkpoints ---------------------------------------------------------------------
    # The state is the library's checkpoint: its bytes (polyak_save_to_memory), loaded as they are
    # (polyak_load_from_memory), which checks everything before it changes anything. Only
    # DTensor params (FSDP2) keep it as tensors, which torch.distributed.checkpoint reshards; the
    # library then writes the checkpoint from them again (_assembled).
    def save(self, path):
        """The library's safetensors checkpoint, written crash-safely: shadow 0 of every averaged
        tensor under its name (safetensors' load_file gives a model its averaged weights), the
        other shadows and the whole state. Sharded EMAs gather the shadows and rank 0 writes the
        checkpoint of the whole model (every rank calls)."""
        self._check_open()
        if not self._sharded():
            self._handle.save(path)
            return
        self._whole_checkpoint(path)

    def state_dict(self):
        """The whole state, exact: {"checkpoint": the library's checkpoint (the bytes save() writes:
        every shadow, the copied buffers, the step state) as a uint8 CPU tensor}. load_state_dict
        restores it, and continuing gives the bits an uninterrupted run gives. Sharded EMAs gather
        (collective) and give the checkpoint of the whole model, which unsharded EMAs load too.
        With DTensor params (FSDP2) the shadows stay tensors so that torch.distributed.checkpoint
        can reshard them: {"metadata": the checkpoint's metadata (strings), "shadows": [one
        {name: DTensor} per shadow, the shadows' exact bits in the shadow dtype], "copies":
        {name: tensor} of the copied buffers}."""
        self._check_open()
        if self._dtensor_params():
            return self._parts()
        return {"checkpoint": self._whole_checkpoint() if self._sharded() else _checkpoint_of(self._handle)}

    def _dtensor_params(self):
        return bool(self._averaged) and _is_dtensor(self._averaged[0].tensor)

    def _parts(self):
        """The checkpoint's metadata and shadows as tensors (DTensors with the params' placements)."""
        header, data = _split(_checkpoint_of(self._handle))
        metadata = dict(header["__metadata__"])
        metadata.pop("checksum")
        if torch.distributed.is_initialized():
            total = torch.tensor([int(metadata["nonfinite_count"])], dtype=torch.int64)
            torch.distributed.all_reduce(total)  # the ranks' counts, summed, so they agree
            metadata["nonfinite_count"] = str(int(total))
        shadows = []
        for k in range(self._handle.num_shadows):
            shadows.append({s.name: self._as_model_tensor(s, _entry(header, data, _saved_name(k, s.name),
                                                                    self.shadow_dtype).to(self.device))
                            for s in self._averaged})
        copies = {s.name: _entry(header, data, s.name, s.dtype).to(self.device) for s in self._copied}
        return {"metadata": metadata, "shadows": shadows, "copies": copies}

    def _whole_checkpoint(self, path=None):
        """Sharded: the checkpoint of an unsharded EMA in this one's state (collective: the
        shadows are gathered on every rank), or with `path` rank 0 saves it there."""
        import torch.distributed as dist
        h = self._handle
        count = torch.tensor([h.nonfinite_count()], dtype=torch.int64)
        dist.all_reduce(count, group=self._group)  # files hold the ranks' sum
        shadows = [[t.cpu() for t in self._gathered(k)] for k in range(h.num_shadows)]
        if path is not None and dist.get_rank(self._group) != 0:
            return None
        copies = [self._read_copy(j).cpu() for j in range(len(self._copied))]  # whole on every rank

        def step_state(metadata):  # the scratch handle's configuration is this one's
            return dict(metadata, step=str(h.step), nonfinite_count=str(int(count)),
                        beta_products=json.dumps([h.beta_product(k) for k in range(h.num_shadows)]))
        return self._assembled(shadows, copies, step_state, path)

    def _assembled(self, shadows, copies, metadata_of, path=None):
        """The library's checkpoint of an unsharded handle like this one whose shadow k of averaged
        tensor i holds shadows[k][i] exactly and whose copied buffer j holds copies[j], with
        metadata_of(its metadata) as the metadata (the checksum kept: it covers the data only). A
        scratch handle of this configuration on the CPU takes the shadows by hard updates
        (shadow <- param, exact) and writes the checkpoint; with `path` it loads the result and
        saves it there, crash-safely."""
        h = self._handle
        params = [torch.zeros(s.shape, dtype=self.shadow_dtype) for s in self._averaged]
        copies = [value.cpu().contiguous() for value in copies]
        with polyak.Handle(self.schedules, shadow_dtype=h.shadow_dtype, zero_init=bool(h.config.zero_init),
                           skip_nonfinite=bool(h.config.skip_nonfinite), seed=h.config.seed,
                           cpu_threads=h.config.cpu_threads) as scratch:
            for s, param in zip(self._averaged, params):
                scratch.add(s.name, _data_ptr(param), h.shadow_dtype, s.shape)
            for s, value in zip(self._copied, copies):
                scratch.add_copy(s.name, _data_ptr(value), _COPY_DTYPE_NAMES[s.dtype], s.shape)
            scratch.finalize()
            for k, values in enumerate(shadows):
                with torch.no_grad():
                    for param, value in zip(params, values):
                        param.copy_(value)
                scratch.hard_update(k)
            header, data = _split(_checkpoint_of(scratch))
            written = header["__metadata__"]
            header["__metadata__"] = dict(metadata_of(written), checksum=written["checksum"])
            checkpoint = _join(header, data)
            if path is not None:
                scratch.load_bytes(_data_ptr(checkpoint), src_num_bytes=checkpoint.numel())
                scratch.save(path)
        return checkpoint

    def load_state_dict(self, state):
        """Restores a state_dict() of an EMA over the same tensors with the same schedules, shadow
        dtype, seed and modes. Everything is checked first (the library checks the state as it
        checks a checkpoint file): a mismatch raises polyak.MismatchError or FormatError and
        changes nothing."""
        self._check_live()
        if not isinstance(state, dict) or "checkpoint" not in state and not {"metadata", "shadows"} <= set(state):
            raise FormatError("a polyak EMA state has 'checkpoint' (or 'metadata' and 'shadows')")
        if "checkpoint" in state:
            checkpoint = state["checkpoint"]
            if not isinstance(checkpoint, torch.Tensor) or checkpoint.dtype != torch.uint8 or checkpoint.dim() != 1:
                raise FormatError("the state's 'checkpoint' is not the uint8 tensor of a polyak checkpoint")
            checkpoint = checkpoint.detach().cpu().contiguous()
        else:
            checkpoint = self._assembled_state(state)
        self._handle.load_bytes(_data_ptr(checkpoint), src_num_bytes=checkpoint.numel())

    def _assembled_state(self, state):
        """The checkpoint of a state as tensors ("metadata", "shadows", "copies"), checked against
        this EMA's tensors (the library checks the rest)."""
        h = self._handle
        shadows, metadata = state["shadows"], state["metadata"]
        if len(shadows) != h.num_shadows:
            raise MismatchError(f"the state has {len(shadows)} shadows, this EMA {h.num_shadows}")
        tensors = []
        for k, values in enumerate(shadows):
            extra = set(values) - {s.name for s in self._averaged}
            if extra:
                raise MismatchError(f"the state's shadow {k} has {sorted(extra)[0]!r}, which this EMA does "
                                    "not average")
            tensors.append([])
            for s in self._averaged:
                if s.name not in values:
                    raise MismatchError(f"the state's shadow {k} lacks {s.name!r}")
                value = values[s.name]
                if self._sharded() and _is_dtensor(value):
                    value = value.full_tensor()
                value = _local(value).detach()
                if value.shape != s.shape or value.dtype != self.shadow_dtype:
                    raise MismatchError(f"the state's {s.name!r} (shadow {k}) is {tuple(value.shape)} "
                                        f"{value.dtype}; this EMA keeps {tuple(s.shape)} {self.shadow_dtype}")
                tensors[k].append(value.cpu())
        given = state.get("copies", {})
        extra = set(given) - {s.name for s in self._copied}
        if extra:
            raise MismatchError(f"the state copies {sorted(extra)[0]!r}, which this EMA does not copy")
        copies = []
        for s in self._copied:
            value = given.get(s.name)
            if value is None or value.shape != s.shape or value.dtype != s.dtype:
                raise MismatchError(f"the state lacks the copied buffer {s.name!r} ({tuple(s.shape)} {s.dtype})")
            copies.append(value.detach())
        metadata = {str(key): str(value) for key, value in metadata.items()}
        if self._dtensor_params() and torch.distributed.get_rank():
            metadata["nonfinite_count"] = "0"  # rank 0 carries the total
        return self._assembled(tensors, copies, lambda _: metadata)

    # ---- presets: other libraries' defaults, mapped exactly ------------------------------
    @classmethod
    def like_timm(cls, model, decay=0.9999, min_decay=0.0, update_after_step=0, use_warmup=False,
                  warmup_gamma=1.0, warmup_power=2 / 3, **options):
        """timm's ModelEmaV3(model, ...) called as update(model, step=step) at every step."""
        if use_warmup:
            schedule = Warmup(beta=decay, beta_min=min_decay, inv_gamma=warmup_gamma, power=warmup_power,
                              start_step=update_after_step)
        else:
            schedule = Constant(decay, start_step=update_after_step + 1)
        return cls(model, schedules=[schedule], **options)

    @classmethod
    def like_averaged_model(cls, model, decay=None, **options):
        """torch.optim.swa_utils.AveragedModel updated at every step: with
        multi_avg_fn=get_ema_multi_avg_fn(decay) an EMA, without it (decay None) the running mean
        (SWA). For SWA's mean of snapshots taken at irregular steps, call update only at those."""
        if decay is None:
            schedule = polyak.Equal(count_updates=True)
        else:
            schedule = Constant(decay, start_step=1)
        return cls(model, schedules=[schedule], buffers=options.pop("buffers", "ignore"), **options)

    @classmethod
    def like_ema_pytorch(cls, model, beta=0.9999, update_after_step=100, update_every=10, inv_gamma=1.0,
                         power=2 / 3, min_value=0.0, **options):
        """ema-pytorch's EMA(model, ...) with update() after every optimizer step: updates at steps
        1, 1 + update_every, ... copying the params up to update_after_step, then its warm-up decay
        of the step count applied once per update (no compensation of the steps between)."""
        if update_after_step % update_every:
            raise UnsupportedError("like_ema_pytorch needs update_after_step a multiple of update_every "
                                   "(its decay then has the Warmup form in the count of updates)")
        schedule = Warmup(beta=beta, beta_min=min_value, inv_gamma=inv_gamma / update_every, power=power,
                          start_step=update_after_step, count_updates=True)
        ema = cls(model, schedules=[schedule], buffers=options.pop("buffers", "average"), **options)
        ema._only_steps = (update_every, 1 % update_every)
        return ema

    @classmethod
    def like_diffusers(cls, model, decay=0.9999, min_decay=0.0, update_after_step=0, use_ema_warmup=False,
                       inv_gamma=1.0, power=2 / 3, **options):
        """diffusers' EMAModel(model.parameters(), ...) with step() after every optimizer step."""
        if use_ema_warmup:
            schedule = Warmup(beta=decay, beta_min=min_decay, inv_gamma=inv_gamma, power=power,
                              start_step=update_after_step)
        else:  # TF's rule from t = 1 on: its first update after update_after_step copies
            if min_decay:
                raise UnsupportedError("like_diffusers: min_decay with the default (TF) rule")
            schedule = polyak.TF(decay, start_step=update_after_step)
        ema = cls(model, schedules=[schedule], buffers=options.pop("buffers", "ignore"), **options)
        if not use_ema_warmup:
            ema._copy_at_step = update_after_step + 1
        return ema
