"""The names Python uses for C enum values (dtypes, backends, roundings) and the checks that turn
Python arguments into C ones."""
import operator

from . import _lib
from .errors import InvalidArgError

MAX_SHADOWS = _lib.MAX_SHADOWS
MAX_SNAPSHOTS = _lib.MAX_SNAPSHOTS
MAX_CPU_THREADS = _lib.MAX_CPU_THREADS
DTYPES = {"f32": _lib.F32, "bf16": _lib.BF16, "f16": _lib.F16,  # averaged tensors and read-outs
          # copy-only tensors (Handle.add_copy) may be any of these as well
          "f64": _lib.F64, "i64": _lib.I64, "i32": _lib.I32, "i16": _lib.I16, "i8": _lib.I8, "u8": _lib.U8,
          "bool": _lib.BOOL}
DTYPE_NAMES = {value: name for name, value in DTYPES.items()}
ROUNDINGS = {"nearest": _lib.ROUND_NEAREST, "stochastic": _lib.ROUND_STOCHASTIC}
BACKENDS = {"cpu": _lib.BACKEND_CPU, "cuda": _lib.BACKEND_CUDA}


def _backend(backend):
    if backend not in BACKENDS:
        raise InvalidArgError(f"backend {backend!r} is not one of {sorted(BACKENDS)}")
    return BACKENDS[backend]


def _dtype(dtype):
    if dtype not in DTYPES:
        raise InvalidArgError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _c_int(value, what):
    """value as a C int: an integer that fits one, else InvalidArgError (ctypes would truncate it)."""
    try:
        value = operator.index(value)
    except TypeError:
        raise InvalidArgError(f"{what} = {value!r} is not an integer") from None
    if not -2 ** 31 <= value < 2 ** 31:
        raise InvalidArgError(f"{what} = {value} does not fit a C int")
    return value
