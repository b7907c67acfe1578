"""polyak.torch.EMA: a model's params (and buffers) registered once, every shadow updated by one C call."""
import contextlib
from collections.abc import Sequence

import torch

import polyak
from polyak import Constant, InvalidArgError, MismatchError, Schedule, StateError, UnsupportedError, Warmup
from polyak._args import _INT64_LIMIT, _c_int, _c_int64
from polyak._lib import lib as _c
from polyak.errors import _check

from . import _select
from ._tensors import _COPY_DTYPE_NAMES, _DTYPE_NAMES, _data_ptr, _is_dtensor, _local
from ._watch import Watch, stale_message
from .dcp import _refuse_open, _Views
from .presets import _Presets
from .sources import _Sources
from .state import _State


class EMA(_State, _Presets, _Sources, _Views):
    """Averages of a model's params (and buffers) kept by libpolyak.

    decay, warmup: one shadow, Constant(decay) or, with warmup, timm's warm-up
    schedule Warmup(beta=decay); `schedules` instead gives up to 8 shadows of
    any polyak schedule (Constant, TF, Warmup, Linear, Cosine, Equal, Power,
    GradNorm, Layerwise, and Lookahead last), all updated by one call.
    start_step and rounding apply to decay/warmup (schedules carry their own):
    beta is 0 (the shadow copies the params) up to start_step; rounding
    "stochastic" rounds the f32 shadow stochastically (long horizons: beta >=
    0.9999). shadow_dtype: torch.float32 (default) or torch.bfloat16
    (stochastic rounding). half_life instead of decay: Constant(0.5 ** (1 /
    h)) for a half-life of h steps: a number of steps, "1000ba" (Composer's
    batches) or "0.05dur", a fraction of total_steps. params: which params are
    averaged: "all" (None), "trainable" (requires_grad), "adapters" (PEFT's
    adapter layers), a glob of names or a list of globs, or a predicate
    f(name, param) -> bool; other_params: what becomes of the rest, "ignore"
    (left out: they keep the model's values) or "copy" (mirrored by each
    update, as diffusers does with frozen params). buffers: "average" (f32,
    bf16 and f16 ones averaged, the others copied), "copy" (all copied) or
    "ignore"; non-persistent buffers are never registered; a copied tensor is
    the library's copy-only tensor: mirrored by every update in the same call,
    written back with the average, saved in checkpoints. shard: with DDP, True
    (the default process group) or a group: each rank keeps 1/W of every
    shadow; reads gather with torch.distributed; buffers are averaged as rank
    0 has them (one broadcast per update). check_stale: before every update,
    check that no registered tensor moved or changed its strides or size
    (measured cost: docs/pytorch.md); False skips that (replaced submodules and
    params are caught either way). cpu_threads: on the CPU, the library's
    threads per call (updates, read-outs, copies), this one's included: 1
    runs on the caller alone, 0 one per core this process may
    run on, N > 1 starts N - 1 workers held until close(); the same bits
    for every count (docs/cpu-threads.md); None: 1, or 0 for offloaded
    shadows. A CUDA EMA ignores it, unless its shadows are offloaded. device: where the shadows live, None (the
    default) or the model's device for the same, "cpu" for a CUDA model: the
    shadows in host memory (no GPU memory; docs/offload.md), folded by
    cpu_threads workers after copies of the params on a stream of the
    library's own; update() makes torch's stream wait for those copies (no
    host sync) unless `optimizer` is given, when an optimizer step pre-hook
    waits for them instead, so that they overlap the next forward and
    backward passes (not for a model with averaged float buffers, which its
    forward writes in place: update() waits for every copy then).
    staging_bytes: the offload's pinned staging size (None: 256 MiB).
    Layerwise shadows (whole gradients) cannot be offloaded.

    The model may be torch.compile'd (its original is registered). The
    averaged tensors must be dense (contiguous, channels_last, any order of
    the dimensions), on one device (CPU or one CUDA device), f32, bf16 or
    f16. Every call raises a polyak.PolyakError subclass on failure and then
    has changed nothing.
    """

    def __init__(self, model: torch.nn.Module, decay: float | None = None, warmup: bool = False, *,
                 schedules: Sequence[Schedule] | None = None, half_life=None, total_steps: int | None = None,
                 start_step: int = 0, rounding: str = "nearest", shadow_dtype=torch.float32, params=None,
                 other_params: str = "ignore", buffers: str = "average", zero_init: bool = False,
                 skip_nonfinite: bool = True, seed: int = 0, shard=None, check_stale: bool = True,
                 cpu_threads: int | None = None, device=None, optimizer=None, staging_bytes: int | None = None,
                 _int_buffers: str = "copy"):
        self._handle = None
        self._watch = None
        self._mesh = None  # sharded: the DeviceMesh of its group, for dcp_state_dict's DTensors
        self._optimizer_hook = None
        if not isinstance(model, torch.nn.Module):
            raise InvalidArgError(f"EMA needs a torch.nn.Module, got {type(model).__name__}")
        model = _select.unwrap(model)  # a torch.compile'd module's original: the same tensors
        if half_life is not None:
            if decay is not None or schedules is not None:
                raise InvalidArgError("give half_life or decay (or schedules), not two of them")
            decay = polyak.beta_from_half_life(polyak.half_life_steps(half_life, total_steps))
        elif total_steps is not None:
            raise InvalidArgError("total_steps goes with a half_life given as a fraction of training ('0.05dur')")
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
        self._last_step = 0  # the last step update() was given: update() without one takes the next
        self._stale = None  # what changed in the model, once something did
        self._mirrors = []  # sharded: (flat, sources) of the buffers' mirrors, rank 0's at each update

        averaged, copied = _select.collect(model, params, other_params, buffers, _int_buffers)
        self.device = _select.check(averaged, copied)
        offload = self._offloaded(device, optimizer, staging_bytes)
        self.shadow_device = torch.device("cpu") if offload else self.device

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
        self._rank = rank
        if world_size > 1:
            self._mirror_buffers(averaged + copied)
            self._sync_buffers()  # the shadows start from rank 0's buffers too
        self._cuda = self.device.type == "cuda"
        self._device_index = self.device.index if self._cuda else None
        if self._cuda and self._device_index is None:
            self._device_index = torch.cuda.current_device()
        handle = polyak.Handle(schedules, backend="cuda" if self._cuda else "cpu",
                               device=self._device_index or 0, shadow_dtype=_DTYPE_NAMES[shadow_dtype],
                               zero_init=zero_init, skip_nonfinite=skip_nonfinite, seed=seed,
                               world_size=world_size, rank=rank,
                               cpu_threads=(0 if offload else 1) if cpu_threads is None else cpu_threads,
                               shadows="host" if offload else "device", staging_bytes=staging_bytes)
        try:
            for s in averaged:  # the library reads each tensor in its memory order
                handle.add(s.name, _data_ptr(s.local), _DTYPE_NAMES[s.local.dtype], s.memory_shape)
            for s in copied:
                handle.add_copy(s.name, _data_ptr(s.local), _COPY_DTYPE_NAMES[s.local.dtype], s.memory_shape)
            handle.finalize(self._stream())
            for s in averaged + copied:
                s.info = handle.tensor_info(handle.find_tensor(s.name))
        except BaseException:
            handle.close()
            raise
        self._handle = handle
        self._model = model
        self.schedules = tuple(schedules)
        self.shadow_dtype = shadow_dtype
        self._averaged = averaged
        self._copied = copied
        self._watch = Watch(model, averaged + copied, self._model_changed)
        self._init_sources(schedules)  # LAWA's gradients, the grad norm (sources.py)
        if offload and optimizer is not None:
            self._overlap_reads(optimizer)
        if world_size > 1:
            self._ranges = self._all_ranges()

    # ---- registration ---------------------------------------------------------------
    def _offloaded(self, device, optimizer, staging_bytes):
        """Whether the shadows go to host memory for a CUDA model (device="cpu")."""
        if device is None:
            offload = False
        else:
            try:
                want = torch.device(device)
            except (RuntimeError, TypeError) as error:
                raise InvalidArgError(f"device={device!r}: {error}") from None
            offload = want.type == "cpu" and self.device.type == "cuda"
            if not offload and (want.type != self.device.type or
                                want.index not in (None, self.device.index)):
                raise InvalidArgError(f"device={device!r}: the shadows live on the model's device ({self.device}) "
                                      "or, for a CUDA model, in host memory (device='cpu')")
        if (optimizer is not None or staging_bytes is not None) and not offload:
            raise InvalidArgError("optimizer and staging_bytes go with device='cpu' for a CUDA model (shadows "
                                  "in host memory); an EMA on the model's device reads the params in its update")
        if optimizer is not None and not hasattr(optimizer, "register_step_pre_hook"):
            raise InvalidArgError(f"optimizer is {type(optimizer).__name__}, not a torch.optim.Optimizer")
        return offload

    def _overlap_reads(self, optimizer):
        """The update's copies of the params overlap the next forward and backward passes: the
        optimizer's step waits for them (on the device) before it writes the params. The library
        makes torch's stream wait for the copy-only tensors and the grad norm at once (the forward
        and clip_grad_norm_ write those before the step), but averaged float buffers (BatchNorm's
        running statistics, averaged with buffers="average") are read with the params and written
        in place by the next forward: a model with any keeps the safe default, update() waiting
        for every copy (docs/offload.md: what writes the params before the step)."""
        if any(s.kind == "buffer" for s in self._averaged):
            return
        import weakref
        me = weakref.ref(self)

        def wait_reads(opt, args, kwargs):
            ema = me()
            if ema is not None and ema._handle is not None and not ema._handle.closed:
                ema.wait_param_reads()

        self._handle.overlap_param_reads(True)
        self._optimizer_hook = optimizer.register_step_pre_hook(wait_reads)

    def wait_param_reads(self):
        """Makes torch's current stream wait (no host sync) until the last update's copies of the
        params are done: call it before anything but the optimizer given to the EMA writes the
        params of an EMA with device='cpu' and an optimizer (a model.load_state_dict, a SAM
        perturbation, a step in a post-accumulate-grad hook). Nothing to wait for otherwise."""
        self.handle.wait_param_reads(self._stream())

    def _mirror_buffers(self, sources):
        """Sharded: the library reads each buffer from a private mirror, which update() fills with
        rank 0's buffer first (one broadcast per dtype): ranks' BatchNorm statistics differ under
        DDP, and rank 0's are the model's (DDP's broadcast_buffers), so the averages are those of
        an unsharded EMA on rank 0."""
        groups = {}
        for s in sources:
            if s.kind == "buffer":
                groups.setdefault(s.target.dtype, []).append(s)
        for dtype, group in groups.items():
            flat = torch.empty(sum(s.target.numel() for s in group), dtype=dtype, device=self.device)
            offset = 0
            for s in group:
                piece = flat[offset:offset + s.target.numel()].view(s.memory_shape)
                s.read_from(s.logical_view(piece))
                offset += s.target.numel()
            self._mirrors.append((flat, group))

    def _sync_buffers(self):
        import torch.distributed as dist
        source = dist.get_global_rank(self._group, 0) if self._group is not None else 0
        for flat, group in self._mirrors:
            if self._rank == 0:
                with torch.no_grad():
                    for s in group:
                        s.local.copy_(s.target)
            dist.broadcast(flat, src=source, group=self._group)

    def _model_changed(self, what):
        if self._stale is None:
            self._stale = what

    def __reduce_ex__(self, protocol):
        raise UnsupportedError(
            "a polyak EMA cannot be pickled or copied (copy.deepcopy, copy.copy, pickle, torch.save of the "
            "object): it holds the library's handle, whose shadows live in C memory, and the addresses of the "
            "model's tensors. Save its state instead: torch.save(ema.state_dict(), path), then "
            "EMA(model, <the same settings>).load_state_dict(torch.load(path)), for a copy of the model too")

    def _check_open(self):
        """For calls that read only the shadows: fine on a stale registration too."""
        if self._handle is None or self._handle.closed:
            raise StateError("the EMA is closed")

    def _check_live(self):
        """For calls that read or write the params."""
        self._check_open()
        if self._stale is None and self._check_stale:
            self._stale = self._watch.changed()
        if self._stale is not None:
            raise StateError(stale_message(self._stale))

    def _check_not_swapped(self, what):
        if self._swapped_in is not None:
            raise StateError(f"{what} inside {self._swapped_in}: the params hold an average there, not the "
                             "trained weights")

    @contextlib.contextmanager
    def _params_swapped(self, what):
        """Marks the params as holding an average (updates refused) for the body, which runs
        without autograd; on exit every module is back in the train/eval mode it had."""
        self._check_live()
        self._check_not_swapped(what)
        modes = [(module, module.training) for module in self._model.modules()]
        self._swapped_in = what
        try:
            with torch.no_grad():
                yield
        finally:
            self._swapped_in = None
            for module, training in modes:
                module.training = training

    def _stream(self):
        if not self._cuda:
            return None
        get = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        return get(self._device_index) if get else torch.cuda.current_stream(self._device_index).cuda_stream

    # ---- the hot path ------------------------------------------------------------------
    def update(self, step: int | None = None):
        """Folds the current params into every shadow as the average after `step` optimizer steps
        (1 for the first). Enqueued on torch's current stream, with no host sync. Without a step,
        the step after the last one given: one step per call, as timm's and ema-pytorch's
        update() are called, once per optimizer step; a step given compensates skipped steps."""
        if type(step) is not int or not 0 < step < _INT64_LIMIT:  # checked in full off the hot path
            step = self._next_step() if step is None else _c_int64(step, "step")
        if self._only_steps is not None and step % self._only_steps[0] != self._only_steps[1]:
            self._last_step = step  # a step the preset leaves out still counts for update()
            return
        self._check_live()
        self._check_not_swapped("update")
        if self._mirrors:
            self._sync_buffers()
        h, stream = self._handle, self._stream()
        grads = self._before_update() if self._reads_sources else None  # the gradient table, current
        status = _c.polyak_update(h._ptr, step, stream)
        if status:
            _check(status, h._ptr, "polyak_update")
        if self._reads_sources:
            self._after_update(stream, grads)  # what it reads, kept for its stream
        self._last_step = step
        if step == self._copy_at_step:
            for k in range(h.num_shadows):
                h.hard_update(k, stream)

    def _next_step(self):
        """update()'s step: one after the last given to update(), or after the handle's own
        (a load_state_dict or graph replays move it on)."""
        return max(self._last_step, self.handle.step) + 1

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
        if self._optimizer_hook is not None:
            self._optimizer_hook.remove()
            self._optimizer_hook = None
        if self._watch is not None:
            self._watch.close()
        if self._handle is not None:
            self._handle.close()

    def __del__(self):
        watch = getattr(self, "_watch", None)
        if watch is not None:
            watch.close()

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
        gathered, then a torch copy per tensor into the model's tensors)."""
        if not self._sharded():
            self._handle.copy_to_params(shadow, self._stream())
            return
        with torch.no_grad():
            for s, value in zip(self._averaged, self._gathered(shadow)):
                s.target.copy_(s.logical_view(value))
            for j, s in enumerate(self._copied):
                if s.kind != "initial":
                    s.target.copy_(s.logical_view(self._read_copy(j)))

    def _averages(self, shadow, dtype=None):
        """{name: tensor} of every registered tensor under each of its names (tied ones share one
        tensor): shadow `shadow` of the averaged ones (in their dtype or `dtype`), the copied ones
        as of the last update, all logical (row-major) whatever the params' memory format."""
        self._check_open()
        if not 0 <= _c_int(shadow, "shadow") < self._handle.num_shadows:
            raise InvalidArgError(f"shadow {shadow} of {self._handle.num_shadows}")
        if dtype is not None and (not isinstance(dtype, torch.dtype) or dtype not in _DTYPE_NAMES):
            raise InvalidArgError(f"dtype {dtype}: averages read out as torch.float32, bfloat16 or float16")
        if self._sharded():
            values = [v.to(dtype or s.dtype) for v, s in zip(self._gathered(shadow), self._averaged)]
        else:
            values = [self._read(shadow, s, dtype or s.dtype) for s in self._averaged]
        values += [self._read_copy(j) for j in range(len(self._copied))]
        out = {}
        for s, value in zip(self._averaged + self._copied, values):
            value = self._as_model_tensor(s, s.to_logical(value))
            out.update((name, value) for name in s.names)
        return out

    def model_state_dict(self, shadow: int = 0, dtype: torch.dtype | None = None):
        """The model's state dict as it is inside average_parameters(shadow): shadow `shadow` of
        every averaged param and buffer (in each tensor's dtype, or in `dtype`: torch.float32,
        bfloat16 or float16, say the f32 shadows of a bf16 model exactly), the copied ones as of
        the last update, and what the EMA leaves out (other params, ignored buffers, extra state)
        as the model's own, which model.state_dict() gives. It loads strictly into the model (the
        original of a torch.compile'd one): tied weights under each name, no non-persistent
        buffers. Tensors are row-major whatever the params' memory format; DTensor params give
        DTensors with the same placements. Refused (polyak.StateError) while a load in place has
        not finished (or failed half-way): the shadows may hold part of a state."""
        self._check_open()
        _refuse_open(self, "model_state_dict")
        averages = self._averages(shadow, dtype)
        out = {}
        for name, value in self._model.state_dict().items():
            out[name] = averages.pop(name, value)
        out.update(averages)  # a stale EMA's tensors that the model no longer has
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
        a copy of the trained one kept for evaluation, say), and the copied tensors; what the EMA
        leaves out stays as `model` has it. Refused (polyak.StateError) while a load in place has
        not finished (or failed half-way), as model_state_dict is."""
        self._check_open()
        _refuse_open(self, "copy_to")
        values = self._averages(shadow)
        model = _select.unwrap(model)
        targets = dict(model.named_parameters(remove_duplicate=False))
        targets.update(model.named_buffers(remove_duplicate=False))
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
    def average_parameters(self, shadow: int = 0, weights: Sequence[float] | None = None):
        """Inside: the model's params hold shadow `shadow` (or the blend sum_k weights[k] shadow_k)
        and copied buffers their values at the last update; on exit, the exact values they had.
        Inside, autograd is off (torch.no_grad()); on exit every module has the train/eval mode
        it had on entry. Updates inside raise polyak.StateError, as does entering while a load in
        place has not finished (or failed half-way)."""
        if weights is not None and self._sharded():
            raise UnsupportedError("blends of sharded shadows: the library blends whole shadows only")
        with self._params_swapped("average_parameters()"):
            yield from self._swap_average(shadow, weights)

    def _swap_average(self, shadow, weights):
        _refuse_open(self, "average_parameters")  # the shadows may hold part of a state: not an average
        h, stream = self._handle, self._stream()
        h.store(stream)  # the params and the copied buffers, restored bit for bit on exit
        # sharded: the buffers the library reads from mirrors, restored here
        kept = [(s.target, s.target.clone()) for s in self._averaged + self._copied if s.private
                and s.kind == "buffer"]
        try:
            if weights is not None:
                h.blend_to_params(list(weights), stream=stream)
            else:
                self._write_params(shadow)
            yield self
        finally:
            h.restore(stream)
            for target, value in kept:
                target.copy_(value)

    # ---- EDM2 post-hoc, adaptive decay ------------------------------------------------
    def snapshot(self, shadow: int) -> torch.Tensor:
        """Shadow `shadow` as one flat float32 tensor where the shadows live (shadow_device), to
        stack for synthesis."""
        self._check_open()
        h = self._handle
        out = torch.empty(h.snapshot_elems(), dtype=torch.float32, device=self.shadow_device)
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
        if not isinstance(snapshots, torch.Tensor):
            raise InvalidArgError(f"snapshots is {type(snapshots).__name__}, not a torch.Tensor")
        snapshots = snapshots.reshape(len(coefficients), -1)
        if snapshots.device != self.shadow_device or snapshots.dtype != torch.float32 or \
                snapshots.shape[1] != h.snapshot_elems():
            raise InvalidArgError(f"snapshots: {len(coefficients)} x {h.snapshot_elems()} float32 on "
                                  f"{self.shadow_device}, "
                                  f"got {tuple(snapshots.shape)} {snapshots.dtype} on {snapshots.device}")
        snapshots = snapshots.contiguous()
        h.store(stream)
        try:
            h.synthesize_to_params(_data_ptr(snapshots), list(coefficients), stream)
            yield self
        finally:
            h.restore(stream)

    # ---- CUDA graphs ---------------------------------------------------------------
    def graph_reserve(self, first_step: int, num_steps: int):
        """Reserves steps first_step .. first_step + num_steps - 1 for graph replays: each replay of
        a captured graph_update() applies the next one."""
        self._check_live()
        if self._mirrors:
            raise UnsupportedError("graph updates of a sharded EMA with buffers: each update broadcasts rank 0's "
                                   "buffers first, which the graph would not hold (buffers='ignore', or an "
                                   "unsharded EMA)")
        if self._reads_sources:
            self._before_update()  # the gradient table the replays read
        self._handle.graph_reserve(first_step, num_steps, self._stream())

    def graph_update(self):
        """The update to capture in torch.cuda.graph(...): one kernel node, copied buffers included."""
        self._check_live()
        self._check_not_swapped("graph_update")
        if self._reads_sources:
            self._check_graph_sources()
        self._handle.graph_update(self._stream())

    def graph_release(self):
        """Ends the reservation (waits for the device); returns the number of steps applied."""
        return self.handle.graph_release()
