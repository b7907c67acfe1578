"""The model's tensors as the library sees them: dtype names, DTensor shards, one registered tensor."""
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
