"""The model's tensors as the library sees them: dtype names, DTensor shards, memory layouts, one
registered tensor."""
import torch

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


def _memory_order(t):
    """The order in which a dense tensor's dimensions are laid out in memory, outermost first
    (perm[j] is the logical dimension stored j-th), or None if it is row-major (contiguous).
    A tensor is dense when its elements fill [data_ptr, data_ptr + nbytes) once each, in some
    order of its dimensions: channels_last, a transpose, any permutation. Raises ValueError
    for one that is not (overlapping, with gaps, expanded)."""
    if t.is_contiguous():
        return None
    shape, strides = t.shape, t.stride()
    unit = [d for d in range(t.dim()) if shape[d] == 1]  # any stride; they go outermost
    rest = sorted((d for d in range(t.dim()) if shape[d] != 1), key=lambda d: -strides[d])
    expected = 1
    for d in reversed(rest):
        if strides[d] != expected:
            raise ValueError(f"strides {tuple(strides)} for shape {tuple(shape)}: not dense")
        expected *= shape[d]
    perm = tuple(unit + rest)
    return None if perm == tuple(range(t.dim())) else perm


def _inverse(perm):
    inverse = [0] * len(perm)
    for j, d in enumerate(perm):
        inverse[d] = j
    return tuple(inverse)


class _Source:
    """One registered tensor: where it lives in the model (its names there, tied aliases
    included) and the memory the library reads; what the library registered (its number, shape
    in memory order, dtype, this rank's slice) is `info`.

    `local` is the memory the library reads and writes: the model's tensor (a DTensor's local
    shard), or a private tensor (`private`: a sharded EMA's mirror of a buffer, which holds rank
    0's values at each update; a buffer ema-pytorch leaves at its first value). `target` is the
    model's own tensor, which average_parameters() writes and the change check watches (None for
    a tensor the model does not hold)."""
    __slots__ = ("names", "slots", "kind", "tensor", "target", "local", "alias", "ptr", "perm", "info")

    def __init__(self, names, slots, kind, tensor, local=None):
        """names: every name of the tensor in the model; slots: (module, attribute) of each; kind:
        "param", "buffer" or "initial" (a buffer kept at its value when the EMA was made)."""
        self.names, self.slots, self.kind, self.tensor = names, slots, kind, tensor
        self.target = tensor._local_tensor if _is_dtensor(tensor) else tensor
        self.perm = _memory_order(self.target)
        self.read_from(self.target if local is None else local)
        self.info = None  # polyak.TensorInfo, once registered

    def read_from(self, local):
        """The library reads `local` (the model's tensor, or a private one of the same layout)."""
        self.local = local
        # a second reference to the memory: a re-allocated param leaves the library reading
        # valid (if stale) memory until the check refuses the update
        self.alias = local.detach()
        self.ptr = _data_ptr(local)

    @property
    def name(self):
        return self.names[0]

    @property
    def private(self):
        return self.local is not self.target

    @property
    def shape(self):  # as registered (in memory order), whatever became of the tensor since
        return torch.Size(self.info.shape)

    @property
    def logical_shape(self):
        shape = self.shape
        return shape if self.perm is None else torch.Size(shape[j] for j in _inverse(self.perm))

    @property
    def memory_shape(self):
        """The shape the library registers: the dimensions in memory order."""
        shape = self.local.shape
        return shape if self.perm is None else torch.Size(shape[d] for d in self.perm)

    @property
    def dtype(self):
        return _TORCH_DTYPES[self.info.dtype]

    def to_logical(self, memory):
        """A tensor of the registered (memory-order) shape as the logical tensor, row-major."""
        return memory if self.perm is None else memory.permute(_inverse(self.perm)).contiguous()

    def logical_view(self, memory):
        """The same, as a view with the model tensor's strides (no copy)."""
        return memory if self.perm is None else memory.permute(_inverse(self.perm))

    def to_memory(self, logical):
        """A logical tensor in the registered (memory-order) shape, contiguous."""
        return logical.contiguous() if self.perm is None else logical.permute(self.perm).contiguous()
