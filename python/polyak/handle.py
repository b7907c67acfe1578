"""polyak.Handle: one polyak_t, the C API on raw pointers, and what it says of a registered tensor."""
import contextlib
import ctypes
import io
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from . import _lib
from ._args import (
    _INT64_LIMIT,
    DTYPE_NAMES,
    DTYPES,
    MAX_SHADOWS,
    _address,
    _backend,
    _c_double,
    _c_int,
    _c_int64,
    _c_size,
    _c_str,
    _c_uint64,
    _dtype,
    _path,
    _shape,
)
from ._lib import lib as _c
from .errors import InvalidArgError, StateError, UnsupportedError, _argument_error, _check, _raise, status_name
from .schedules import Constant, Lookahead, Schedule, _check_config


def _shape_array(shape):
    shape = _shape(shape)
    return len(shape), (ctypes.c_int64 * max(len(shape), 1))(*shape)


def _memory(buffer, num_bytes, what, writable):
    """(address, num_bytes, keep) of memory a call reads or writes: a buffer (bytes, bytearray,
    array.array, a numpy array, a memoryview: its own size), or an int address with num_bytes,
    the bytes there. `keep` holds what the address lives in until the call is made."""
    if isinstance(buffer, int):
        if num_bytes is None:
            raise InvalidArgError(f"{what} is an address: give {what}_num_bytes, the bytes it holds")
        return _address(buffer, what), _c_size(num_bytes, f"{what}_num_bytes"), None
    if num_bytes is not None:
        raise InvalidArgError(f"{what} is a buffer, which has its own size: leave {what}_num_bytes out")
    try:
        view = memoryview(buffer)
    except TypeError:
        raise InvalidArgError(f"{what} is {type(buffer).__name__}: an int address or a buffer") from None
    if not view.c_contiguous:
        raise InvalidArgError(f"{what} is not contiguous memory")
    if view.nbytes == 0:
        return None, 0, None
    if view.readonly:
        if writable:
            raise InvalidArgError(f"{what} is read-only")
        keep = view.tobytes() if not isinstance(buffer, bytes) else buffer  # ctypes passes bytes as is
        return ctypes.cast(ctypes.c_char_p(keep), ctypes.c_void_p).value, view.nbytes, keep
    keep = (ctypes.c_char * view.nbytes).from_buffer(view)
    return ctypes.addressof(keep), view.nbytes, keep


@contextlib.contextmanager
def _file_descriptor(file):
    """The fd of `file` (an int fd, or a binary file object) at the file's offset for the body,
    which moves the offset; a file object's buffer then follows it there."""
    if isinstance(file, int):
        yield _c_int(file, "file")
        return
    if isinstance(file, io.TextIOBase) or not hasattr(file, "fileno"):
        raise InvalidArgError(f"file is {type(file).__name__}: an int fd or a file object opened in binary mode")
    fd = file.fileno()
    if file.writable():
        file.flush()
    os.lseek(fd, file.tell(), os.SEEK_SET)  # a buffered reader may have read ahead
    try:
        yield fd
    finally:
        offset = os.lseek(fd, 0, os.SEEK_CUR)
        file.seek(0, os.SEEK_END)  # drops what the buffer holds (a seek within it would keep it)
        file.seek(offset)


@dataclass(frozen=True)
class TensorInfo:
    """What a handle knows of one registered tensor (polyak_tensor_info).

    index: its number (registration order), what read-outs take. dtype: the param's;
    shadow_dtype: what shadow 0 keeps it in (the handle's shadow dtype, the caller's shadow's,
    or for a copy-only tensor its own dtype). local_range: (first_elem, num_elems) of the
    elements this rank keeps shadows of, all of them unless sharded (copy-only tensors: all on
    every rank); None before finalize."""
    index: int
    name: str
    dtype: str
    shape: tuple
    num_elems: int
    shadow_dtype: str
    copy_only: bool
    callers_shadow: bool
    local_range: tuple | None

    @property
    def num_bytes(self):
        """The bytes of the param: num_elems of its dtype."""
        return self.num_elems * _DTYPE_BYTES[self.dtype]


_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "f64": 8, "i64": 8, "i32": 4, "i16": 2, "i8": 1, "u8": 1,
                "bool": 1}


class Handle:
    """One polyak_t: shadows of registered tensors, all updated by one call.

    Pointers are ints (a tensor's data_ptr()) on the backend's side: host
    memory for backend "cpu", device memory for "cuda"; `stream` is a
    cudaStream_t as an int, or None for the default stream. cpu_threads:
    the CPU backend's threads per call, the caller's included (1, the
    default: the caller alone; 0: one per core this process may run on; at
    most MAX_CPU_THREADS; the workers start at finalize and are joined by
    close; the same bits for every count; docs/cpu-threads.md); the CUDA
    backend ignores it. shadows: "device" (the default: in the backend's
    memory) or "host": with backend "cuda", the params stay on the device and
    the shadows live in host memory, folded by the CPU's workers
    (cpu_threads) after copies on a stream of the handle's own; staging_bytes
    sets its pinned staging size (None: 256 MiB); docs/offload.md. See
    include/polyak.h for each call's rules; a failing call raises and
    changes nothing."""

    def __init__(self, schedules: Sequence[Schedule] = (Constant(0.999),), *, backend="cpu", device=0,
                 shadow_dtype="f32", zero_init=False, skip_nonfinite=True, seed=0, world_size=1, rank=0,
                 nccl_comm=None, cpu_threads=1, shadows="device", staging_bytes=None):
        self._ptr = None
        self._views = 0  # DLPack views of the shadows alive (shadow_capsule)
        self._held = None  # closed with views alive: the polyak_t the last view frees
        self._views_lock = threading.Lock()  # views are freed on any thread (GC, DCP's writers)
        schedules = list(schedules)
        if not 1 <= len(schedules) <= MAX_SHADOWS:
            raise InvalidArgError(f"{len(schedules)} schedules: a handle has 1..{MAX_SHADOWS} shadows")
        for k, s in enumerate(schedules):
            if not isinstance(s, Schedule):
                raise InvalidArgError(f"schedules[{k}] is {type(s).__name__}, not a polyak.Schedule")
            if isinstance(s, Lookahead) and k != len(schedules) - 1:
                raise InvalidArgError("Lookahead must be the last schedule (its shadow holds the slow weights)")
        cfg = _lib.config_defaults(_c)
        cfg.backend = _backend(backend)
        cfg.device = _c_int(device, "device")
        cfg.num_shadows = len(schedules)
        for k, s in enumerate(schedules):
            s._apply(cfg, k)
        if not isinstance(shadow_dtype, str) or shadow_dtype not in ("f32", "bf16"):
            raise InvalidArgError(f"shadow_dtype {shadow_dtype!r}: library-kept shadows are 'f32' or 'bf16'")
        cfg.shadow_dtype = DTYPES[shadow_dtype]
        cfg.zero_init = int(bool(zero_init))
        cfg.skip_nonfinite = int(bool(skip_nonfinite))
        cfg.seed = _c_uint64(seed, "seed")
        cfg.world_size = _c_int(world_size, "world_size")
        cfg.rank = _c_int(rank, "rank")
        cfg.nccl_comm = _address(nccl_comm, "nccl_comm")
        cfg.cpu_threads = _c_int(cpu_threads, "cpu_threads")
        if shadows not in ("device", "host"):
            raise InvalidArgError(f"shadows={shadows!r}: 'device' or 'host'")
        cfg.shadow_location = 1 if shadows == "host" else 0
        _check_config(cfg)
        ptr = ctypes.c_void_p()
        status = _c.polyak_create(ctypes.byref(ptr), ctypes.byref(cfg))
        if status:
            _check_config(cfg)  # says why, if it can
            _raise(status, f"polyak_create: {status_name(status)}")
        self._pid = os.getpid()  # the process whose threads and device work the handle has
        self._ptr = ptr.value
        if staging_bytes is not None:
            try:
                self._call("polyak_set_offload_staging", _c_size(staging_bytes, "staging_bytes"))
            except BaseException:
                self.close()
                raise
        self.shadows = shadows
        self.schedules = tuple(schedules)
        self.backend = backend
        self.shadow_dtype = shadow_dtype
        self.num_shadows = len(schedules)
        self.world_size = cfg.world_size
        self.rank = cfg.rank
        self.config = cfg

    # -- lifecycle
    def _h(self):
        if self._ptr is None:
            raise StateError("the polyak handle is closed")
        return self._ptr

    def close(self):
        """Frees the handle and its shadows (waits for its device work). Idempotent. With views
        of the shadows alive (shadow_capsule), every later call refuses at once but the memory is
        freed when the last view is: a view never outlives what it shows. In a process forked
        from the one that made it (ddp_fork, a DataLoader worker), the handle is closed but
        nothing is freed: the child has a copy of its memory, not its CPU worker threads or its
        CUDA context, and polyak_destroy would wait on them forever; the child's copy is left to
        the child's exit."""
        ptr, self._ptr = self._ptr, None
        if ptr is None or getattr(self, "_pid", None) != os.getpid():
            return
        with self._views_lock:
            if self._views:
                self._held = ptr
                return
        _c.polyak_destroy(ptr)

    def _release_view(self):
        with self._views_lock:
            self._views -= 1
            if self._views or self._held is None:
                return
            ptr, self._held = self._held, None
        if _c is None or self._pid != os.getpid():  # None: interpreter teardown
            return
        _c.polyak_destroy(ptr)

    @property
    def closed(self):
        return self._ptr is None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_ptr", None) is not None and _c is not None:
            self.close()

    def __reduce_ex__(self, protocol):
        raise UnsupportedError("a polyak.Handle cannot be pickled or copied: its shadows live in the library's "
                               "memory and it reads its params through their addresses. Save its state instead: "
                               "save_bytes() or save(path), and load_bytes()/load(path) into a handle made and "
                               "registered the same way")

    @property
    def last_error(self):
        return _c.polyak_last_error(self._h()).decode("utf-8", "replace")

    def _call(self, name, *args):
        h = self._h()
        try:
            status = getattr(_c, name)(h, *args)
        except ctypes.ArgumentError as error:  # a value no check above caught: name the C parameter
            raise _argument_error(name, error, (h, *args)) from None
        _check(status, h, name)

    # -- the shadows in place (docs/shadow-views.md)
    def shadow_data(self, shadow: int, tensor: int):
        """(address, dtype, num_elems) of this rank's piece of shadow `shadow` of tensor `tensor`
        (a copy-only tensor: shadow 0, its mirror) as updates keep it: contiguous, in the
        tensor's flattened order from its local_range's first element, at the same address until
        the handle's memory is freed (loads copy into it). Address 0 for an empty piece."""
        data, dtype, num_elems = ctypes.c_void_p(), ctypes.c_int(), ctypes.c_int64()
        self._call("polyak_shadow_data", _c_int(shadow, "shadow"), _c_int(tensor, "tensor"), ctypes.byref(data),
                   ctypes.byref(dtype), ctypes.byref(num_elems))
        return data.value or 0, DTYPE_NAMES[dtype.value], num_elems.value

    def shadow_capsule(self, shadow: int, tensor: int):
        """A DLPack capsule ("dltensor") of shadow_data's piece, one flat tensor where the shadows
        live (the handle's device, or the host for shadows="host"), for torch.from_dlpack: no copy;
        the consumer's tensor keeps this handle's memory alive (close() then frees it when the last
        such tensor is freed; a capsule dropped unconsumed releases its hold when it is freed).
        Writing through it is for begin_shadow_write ... set_step_state."""
        from ._dlpack import capsule
        address, dtype, num_elems = self.shadow_data(shadow, tensor)
        on_device = self.backend == "cuda" and self.shadows != "host"
        device = ("cuda", self.config.device) if on_device else ("cpu", 0)
        with self._views_lock:  # counted first: the capsule's deleter may run on another thread at once
            self._views += 1
        try:
            return capsule(address, num_elems, dtype, device, self)
        except BaseException:
            self._release_view()
            raise

    def step_state(self) -> dict:
        """The step state (polyak_get_step_state): {"step", "nonfinite_count", "beta_products",
        "update_counts"}, the last two one value per shadow, and "shadows_open" (inside
        begin_shadow_write). Waits for the device."""
        state = _lib.StepState()
        self._call("polyak_get_step_state", ctypes.byref(state))
        k = state.num_shadows
        return {"step": state.step, "nonfinite_count": state.nonfinite_count,
                "beta_products": list(state.beta_products[:k]), "update_counts": list(state.update_counts[:k]),
                "shadows_open": bool(state.shadows_open)}

    def begin_shadow_write(self):
        """Before writing shadows in place: updates, hard updates, graph reservations and saves
        refuse (polyak.StateError) until set_step_state or a load succeeds."""
        self._call("polyak_begin_shadow_write")

    def set_step_state(self, step: int, nonfinite_count: int, beta_products: Sequence[float],
                       update_counts: Sequence[int]):
        """Replaces the step state, checked by the library (a bad value raises
        polyak.InvalidArgError naming it and changes nothing), and ends begin_shadow_write."""
        if len(beta_products) != self.num_shadows or len(update_counts) != self.num_shadows:
            raise InvalidArgError(f"beta_products and update_counts: one value per shadow ({self.num_shadows})")
        state = _lib.StepState(ctypes.sizeof(_lib.StepState), self.num_shadows, 0, _c_int64(step, "step"),
                               _c_int64(nonfinite_count, "nonfinite_count"))
        for k in range(self.num_shadows):
            state.beta_products[k] = _c_double(beta_products[k], f"beta_products[{k}]")
            state.update_counts[k] = _c_int64(update_counts[k], f"update_counts[{k}]")
        self._call("polyak_set_step_state", ctypes.byref(state))

    # -- registration
    def add(self, name: str, param: int, dtype: str, shape: Sequence[int]):
        """Registers a tensor: `param` points at its contiguous elements. Returns its number."""
        ndim, dims = _shape_array(shape)
        self._call("polyak_add", _c_str(name, "name"), _address(param, "param"), _dtype(dtype), ndim, dims)
        return self.num_tensors - 1

    def add_copy(self, name: str, param: int, dtype: str, shape: Sequence[int]):
        """Registers a tensor that is not averaged but travels with the averages (a buffer such as
        BatchNorm's running statistics or a step counter), of any dtype in DTYPES: every shadow of
        it is one mirror of the param, set at finalize and by every update in the same pass, read
        out in its dtype, written back by copy_to_params and blends, kept by store/restore, saved
        once in checkpoints. Returns its number."""
        ndim, dims = _shape_array(shape)
        self._call("polyak_add_copy", _c_str(name, "name"), _address(param, "param"), _dtype(dtype), ndim, dims)
        return self.num_tensors - 1

    def add_arena(self, base: int, dtype: str, arena_num_elems: int, views: Sequence[tuple]):
        """Registers the tensors of one allocation: views [(name, shape), ...] laid end to end from
        `base`, all of `dtype`, which must cover exactly arena_num_elems elements (else nothing is
        registered and the error says which view is too large, or which elements no view covers).
        Returns their numbers."""
        views = [(_c_str(name, f"views[{i}] name"), _shape(shape, f"views[{i}] shape"))
                 for i, (name, shape) in enumerate(views)]
        for name, shape in views:
            if len(shape) > _lib.MAX_NDIM:
                raise InvalidArgError(f"add_arena: view {name.decode()!r} has {len(shape)} dimensions, "
                                      f"at most {_lib.MAX_NDIM}")
        table = (_lib.View * max(len(views), 1))()
        for entry, (name, shape) in zip(table, views):
            entry.name, entry.ndim = name, len(shape)
            entry.shape[:len(shape)] = shape
        first = self.num_tensors
        if _c_int64(arena_num_elems, "arena_num_elems") < 0:
            raise InvalidArgError(f"add_arena: arena_num_elems = {arena_num_elems}")
        self._call("polyak_add_arena", _address(base, "base"), _dtype(dtype), arena_num_elems, table,
                   _c_int(len(views), "len(views)"))
        return list(range(first, self.num_tensors))

    def add_with_shadow(self, name: str, param: int, dtype: str, shape: Sequence[int], shadow: int,
                        shadow_dtype: str, round_nearest=False):
        """Registers a tensor whose (only) shadow is the caller's memory `shadow`, updated in place."""
        ndim, dims = _shape_array(shape)
        self._call("polyak_add_with_shadow", _c_str(name, "name"), _address(param, "param"), _dtype(dtype), ndim,
                   dims, _address(shadow, "shadow"), _dtype(shadow_dtype, "shadow_dtype"),
                   _lib.SHADOW_ROUND_NEAREST if round_nearest else 0)
        return self.num_tensors - 1

    def finalize(self, stream=None):
        self._call("polyak_finalize", _address(stream, "stream"))

    # -- the hot path
    def update(self, step: int | None = None, stream=None):
        """Folds the params into every shadow as the average after `step` optimizer steps; without
        a step, the step after the last update's."""
        h = self._ptr
        if h is None:
            self._h()
        if type(step) is not int or not 0 < step < _INT64_LIMIT:  # checked in full off the hot path
            step = self.step + 1 if step is None else _c_int64(step, "step")
        if stream is not None:
            stream = _address(stream, "stream")
        status = _c.polyak_update(h, step, stream)
        if status:
            _check(status, h, "polyak_update")

    def hard_update(self, shadow: int, stream=None):
        self._call("polyak_hard_update", _c_int(shadow, "shadow"), _address(stream, "stream"))

    # -- read-outs and evaluation
    # dst: a writable buffer on the host (array.array, bytearray, a numpy array: its own size), or an
    # int address on the backend's side with dst_num_bytes; a dst too short is refused with nothing
    # written (polyak_get_shadow_n and the other _n read-outs)
    def get_shadow(self, shadow: int, tensor: int, dst, dst_dtype="f32", stream=None, *, dst_num_bytes=None):
        """Shadow `shadow` (which average) of tensor `tensor` (which parameter) into dst, debiased
        with zero_init; a copy-only tensor's mirror in its dtype."""
        address, num_bytes, keep = _memory(dst, dst_num_bytes, "dst", writable=True)
        self._call("polyak_get_shadow_n", _c_int(shadow, "shadow"), _c_int(tensor, "tensor"), address,
                   _dtype(dst_dtype, "dst_dtype"), num_bytes, _address(stream, "stream"))

    def get_local_shadow(self, shadow: int, tensor: int, dst, dst_dtype="f32", stream=None, *,
                         dst_num_bytes=None):
        """Like get_shadow for this rank's piece of the tensor only (local_range): no communication."""
        address, num_bytes, keep = _memory(dst, dst_num_bytes, "dst", writable=True)
        self._call("polyak_get_local_shadow_n", _c_int(shadow, "shadow"), _c_int(tensor, "tensor"), address,
                   _dtype(dst_dtype, "dst_dtype"), num_bytes, _address(stream, "stream"))

    def local_range(self, tensor: int):
        """(first_elem, num_elems) of the tensor's elements whose shadows this rank keeps."""
        first, count = ctypes.c_int64(), ctypes.c_int64()
        self._call("polyak_local_range", _c_int(tensor, "tensor"), ctypes.byref(first), ctypes.byref(count))
        return first.value, count.value

    def copy_to_params(self, shadow=0, stream=None):
        self._call("polyak_copy_to_params", _c_int(shadow, "shadow"), _address(stream, "stream"))

    def store(self, stream=None):
        self._call("polyak_store", _address(stream, "stream"))

    def restore(self, stream=None):
        self._call("polyak_restore", _address(stream, "stream"))

    def discard_store(self):
        """Ends a pending store without writing the params back (training goes on from the params
        as they are); the kept copy is dropped."""
        self._call("polyak_discard_store")

    def _weights(self, weights):
        if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
            raise InvalidArgError(f"weights = {weights!r} is not a sequence of numbers")
        if len(weights) != self.num_shadows:
            raise InvalidArgError(f"{len(weights)} blend weights for {self.num_shadows} shadows")
        return (ctypes.c_double * self.num_shadows)(*(_c_double(w, f"weights[{k}]") for k, w in enumerate(weights)))

    def blend_to_params(self, weights: Sequence[float], any_weights=False, stream=None):
        self._call("polyak_blend_to_params", self._weights(weights),
                   _lib.BLEND_ANY_WEIGHTS if any_weights else 0, _address(stream, "stream"))

    def get_blend(self, weights: Sequence[float], tensor: int, dst, dst_dtype="f32", any_weights=False,
                  stream=None, *, dst_num_bytes=None):
        address, num_bytes, keep = _memory(dst, dst_num_bytes, "dst", writable=True)
        self._call("polyak_get_blend_n", self._weights(weights), _lib.BLEND_ANY_WEIGHTS if any_weights else 0,
                   _c_int(tensor, "tensor"), address, _dtype(dst_dtype, "dst_dtype"), num_bytes,
                   _address(stream, "stream"))

    # -- state
    @property
    def step(self):
        """The step of the last update (0 before the first)."""
        out = ctypes.c_int64()
        self._call("polyak_get_step", ctypes.byref(out))
        return out.value

    @property
    def num_tensors(self):
        out = ctypes.c_int()
        self._call("polyak_num_tensors", ctypes.byref(out))
        return out.value

    def tensor_info(self, tensor: int) -> TensorInfo:
        """Tensor number `tensor`'s name, dtypes, shape and slice."""
        info = _lib.TensorInfo()
        self._call("polyak_tensor_info", _c_int(tensor, "tensor"), ctypes.byref(info))
        local = None if info.local_num_elems < 0 else (info.local_first_elem, info.local_num_elems)
        copy_only = bool(info.flags & _lib.TENSOR_COPY)
        return TensorInfo(index=tensor, name=info.name.decode("utf-8"), dtype=DTYPE_NAMES[info.dtype],
                          shape=tuple(info.shape[:info.ndim]), num_elems=info.num_elems,
                          shadow_dtype=DTYPE_NAMES[info.dtype if copy_only else info.shadow_dtype],
                          copy_only=copy_only,
                          callers_shadow=bool(info.flags & _lib.TENSOR_CALLERS_SHADOW), local_range=local)

    def find_tensor(self, name: str) -> int:
        """The number of the tensor registered as `name` (InvalidArgError if none is)."""
        out = ctypes.c_int()
        self._call("polyak_find_tensor", _c_str(name, "name"), ctypes.byref(out))
        return out.value

    def tensors(self):
        """Every registered tensor's TensorInfo, in registration order."""
        return [self.tensor_info(i) for i in range(self.num_tensors)]

    def nonfinite_count(self):
        """Non-finite param elements met by the updates so far (waits for the device)."""
        out = ctypes.c_int64()
        self._call("polyak_nonfinite_count", ctypes.byref(out))
        return out.value

    def beta_product(self, shadow: int):
        """The product of the betas applied to `shadow` so far."""
        out = ctypes.c_double()
        self._call("polyak_get_beta_product", _c_int(shadow, "shadow"), ctypes.byref(out))
        return out.value

    # -- adaptive modes
    def overlap_param_reads(self, overlap: bool):
        """True: later updates leave their reads of the params in flight (an offloaded handle's
        copies to the host) instead of making their stream wait, and the trainer calls
        wait_param_reads before anything next writes the params; False (the default): the update's
        stream waits for them."""
        self._call("polyak_overlap_param_reads", int(bool(overlap)))

    def wait_param_reads(self, stream=None):
        """Makes `stream` wait, on the device, until the last update's reads of the params are
        done; raises an error that work queued by an update met, if known by now."""
        self._call("polyak_wait_param_reads", _address(stream, "stream"))

    def set_grad_norm(self, grad_norm: int):
        """The float (backend memory) that GradNorm shadows read at every update."""
        self._call("polyak_set_grad_norm", _address(grad_norm, "grad_norm"))

    def set_grads(self, grads: Sequence[int]):
        """Tensor i's gradient pointer at [i], one per registered tensor (None for copy-only ones), read
        by Layerwise shadows at every update. The table the handle holds returns at once."""
        grads = [_address(g, f"grads[{i}]") for i, g in enumerate(grads)]
        if len(grads) != self.num_tensors:  # the library reads num_tensors pointers
            raise InvalidArgError(f"set_grads: {len(grads)} pointers for {self.num_tensors} registered tensors")
        table = (ctypes.c_void_p * max(len(grads), 1))(*grads)
        self._call("polyak_set_grads", table)

    def set_layer_norms(self, norms: int):
        self._call("polyak_set_layer_norms", _address(norms, "norms"))

    def layer_betas(self, shadow: int):
        out = (ctypes.c_double * max(self.num_tensors, 1))()
        self._call("polyak_get_layer_betas", _c_int(shadow, "shadow"), out)
        return list(out)[:self.num_tensors]

    # -- EDM2 post-hoc
    def snapshot_elems(self):
        out = ctypes.c_int64()
        self._call("polyak_snapshot_elems", ctypes.byref(out))
        return out.value

    def snapshot(self, shadow: int, dst: int, stream=None):
        self._call("polyak_snapshot", _c_int(shadow, "shadow"), _address(dst, "dst"), _address(stream, "stream"))

    def synthesize_to_params(self, snapshots: int, coefficients: Sequence[float], stream=None):
        count = len(coefficients)
        array = (ctypes.c_double * max(count, 1))(*(_c_double(c, f"coefficients[{i}]")
                                                     for i, c in enumerate(coefficients)))
        self._call("polyak_synthesize_to_params", _address(snapshots, "snapshots"), _c_int(count, "len(coefficients)"),
                   array, _address(stream, "stream"))

    # -- checkpoints: the same bytes to a path, an open file or memory; every load checks them alike
    def save(self, path):
        """A safetensors file at `path`, written crash-safely (a new file renamed over it)."""
        self._call("polyak_save", _path(path))

    def load(self, path):
        """Replaces every shadow and the step state with those saved; everything is checked first."""
        self._call("polyak_load", _path(path))

    def save_size(self):
        """A size in bytes that always holds this handle's checkpoint (a save writes a few less)."""
        out = ctypes.c_size_t()
        self._call("polyak_save_size", ctypes.byref(out))
        return out.value

    def save_to_memory(self, dst, *, dst_num_bytes=None):
        """The checkpoint into dst (host memory: a writable buffer, or an int address with
        dst_num_bytes); returns the bytes written. A dst shorter than needed is refused with nothing
        written (save_size() always suffices)."""
        address, num_bytes, keep = _memory(dst, dst_num_bytes, "dst", writable=True)
        written = ctypes.c_size_t()
        self._call("polyak_save_to_memory", address, num_bytes, ctypes.byref(written))
        return written.value

    def save_bytes(self) -> bytes:
        """The checkpoint as bytes: what save() writes to a file, byte for byte."""
        buffer = bytearray(self.save_size())
        del buffer[self.save_to_memory(buffer):]
        return bytes(buffer)

    def load_bytes(self, src, *, src_num_bytes=None):
        """Loads one checkpoint from host memory: bytes or another buffer holding exactly it, or an
        int address with src_num_bytes. Checks and effects as load()."""
        address, num_bytes, keep = _memory(src, src_num_bytes, "src", writable=False)
        self._call("polyak_load_from_memory", address, num_bytes)

    def save_fd(self, file):
        """The checkpoint at the current offset of an open file (an int fd, or a file object, which
        is flushed first), leaving the offset just past it for what the caller writes next. Not
        atomic and not fsynced: make the whole file crash-safe as save() does."""
        with _file_descriptor(file) as fd:
            self._call("polyak_save_fd", fd)

    def load_fd(self, file):
        """Loads the checkpoint that starts at the current offset of an open file (an int fd or a
        file object) and leaves the offset just past it. Checks and effects as load(); on failure
        the offset stays."""
        with _file_descriptor(file) as fd:
            self._call("polyak_load_fd", fd)

    # -- CUDA graphs
    def graph_reserve(self, first_step: int, num_steps: int, stream=None):
        self._call("polyak_graph_reserve", _c_int64(first_step, "first_step"), _c_int64(num_steps, "num_steps"),
                   _address(stream, "stream"))

    def graph_update(self, stream=None):
        self._call("polyak_graph_update", _address(stream, "stream"))

    def graph_release(self):
        """Ends a reservation; returns the number of steps the replays applied."""
        done = ctypes.c_int64()
        h = self._h()
        status = _c.polyak_graph_release(h, ctypes.byref(done))
        _check(status, h, "polyak_graph_release")
        return done.value
