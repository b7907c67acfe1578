"""The names Python uses for C enum values (dtypes, backends, roundings) and the checks that turn
Python arguments into C ones."""
import ctypes
import operator
import os

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
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise InvalidArgError(f"backend {backend!r} is not one of {sorted(BACKENDS)}")
    return BACKENDS[backend]


def _dtype(dtype, what="dtype"):
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise InvalidArgError(f"{what} {dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]


# Python values into C arguments. ctypes refuses a wrong type with its own ArgumentError or
# TypeError, which do not say which argument, and silently truncates an integer too large for
# its C type (a step of 2**64 + 3 would arrive as 3): each check here raises InvalidArgError
# naming the argument instead.

def _integer(value, what, low, high, c_name):
    if type(value) is not int:
        try:
            value = operator.index(value)  # bool, numpy and torch integers; never a float or a str
        except TypeError:
            raise InvalidArgError(f"{what} = {value!r} is not an integer") from None
    if not low <= value <= high:
        raise InvalidArgError(f"{what} = {value} does not fit a C {c_name}")
    return value


_POINTER_MAX = 2 ** (8 * ctypes.sizeof(ctypes.c_void_p)) - 1
_INT64_LIMIT = 2 ** 63  # int64_t holds -_INT64_LIMIT .. _INT64_LIMIT - 1


def _c_int(value, what):
    """value as a C int: an integer that fits one, else InvalidArgError."""
    return _integer(value, what, -2 ** 31, 2 ** 31 - 1, "int")


def _c_int64(value, what):
    return _integer(value, what, -_INT64_LIMIT, _INT64_LIMIT - 1, "int64_t")


def _c_uint64(value, what):
    return _integer(value, what, 0, 2 ** 64 - 1, "uint64_t")


def _c_size(value, what):
    return _integer(value, what, 0, 2 ** (8 * ctypes.sizeof(ctypes.c_size_t)) - 1, "size_t")


def _address(value, what):
    """A pointer (an int address, or None for NULL: the default stream, say)."""
    return None if value is None else _integer(value, what, 0, _POINTER_MAX, "pointer")


def _c_double(value, what):
    """value as a C double: a real number (int, float, numpy's, a one-element tensor), not a str."""
    if type(value) is float:
        return value
    if not isinstance(value, (str, bytes)) and hasattr(value, "__float__"):
        try:
            return float(value)
        except (TypeError, ValueError, OverflowError, RuntimeError):
            pass
    raise InvalidArgError(f"{what} = {value!r} is not a number")


def _c_str(value, what):
    """A str as the UTF-8 bytes a const char * takes."""
    if not isinstance(value, str):
        raise InvalidArgError(f"{what} = {value!r} is not a str")
    return value.encode()


def _path(value, what="path"):
    """A file system path (str, bytes or os.PathLike) as bytes."""
    try:
        return os.fsencode(value)
    except TypeError:
        raise InvalidArgError(f"{what} = {value!r} is not a path") from None


def _shape(shape, what="shape"):
    """A shape (a sequence of integers) as a tuple of ints."""
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__"):
        raise InvalidArgError(f"{what} = {shape!r} is not a sequence of integers")
    return tuple(_c_int64(d, f"{what}[{i}]") for i, d in enumerate(shape))
