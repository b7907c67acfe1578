"""polyak's exceptions: one PolyakError subclass per C status, raised with polyak_last_error()'s text."""
import re

from . import _lib
from ._lib import lib as _c

# ---- errors ------------------------------------------------------------------

class PolyakError(Exception):
    """A failing polyak call; `status` is the C status value, `status_name` its enum name."""
    status = None

    @property
    def status_name(self):
        return status_name(self.status) if self.status is not None else None


class InvalidArgError(PolyakError, ValueError):
    status = _lib.ERR_INVALID_ARG


class StateError(PolyakError, RuntimeError):
    status = _lib.ERR_STATE


class NoMemoryError(PolyakError, MemoryError):
    status = _lib.ERR_NO_MEMORY


class UnsupportedError(PolyakError, NotImplementedError):
    status = _lib.ERR_UNSUPPORTED


class CudaError(PolyakError, RuntimeError):
    status = _lib.ERR_CUDA


class NcclError(PolyakError, RuntimeError):
    status = _lib.ERR_NCCL


class FileIOError(PolyakError, OSError):
    status = _lib.ERR_IO


class FormatError(PolyakError, ValueError):
    status = _lib.ERR_FORMAT


class MismatchError(PolyakError, ValueError):
    status = _lib.ERR_MISMATCH


_ERRORS = {cls.status: cls for cls in (InvalidArgError, StateError, NoMemoryError, UnsupportedError, CudaError,
                                       NcclError, FileIOError, FormatError, MismatchError)}


def _raise(status, message):
    cls = _ERRORS.get(status)
    if cls is None:
        error = PolyakError(message)
        error.status = status
        raise error
    raise cls(message)


def _check(status, handle, what):
    """Raises the status's error with the handle's last-error text (or the status name)."""
    if status:
        detail = _c.polyak_last_error(handle).decode("utf-8", "replace") if handle else ""
        _raise(status, detail or f"{what}: {status_name(status)}")


def _argument_error(function, error, args):
    """InvalidArgError for the ctypes.ArgumentError of a call to `function` with `args`, naming
    the C parameter it refused (ctypes numbers them from 1)."""
    found = re.match(r"argument (\d+)", str(error))
    params = [name for name, _ in _lib.FUNCTIONS[function][1]]
    if found and 0 < int(found.group(1)) <= len(params):
        index = int(found.group(1)) - 1
        return InvalidArgError(f"{function}: {params[index]} = {args[index]!r} is not a valid "
                               f"{_lib.FUNCTIONS[function][1][index][1].__name__}")
    return InvalidArgError(f"{function}: {error}")


def status_name(status):
    """The C enum name of a status value ("POLYAK_ERR_STATE")."""
    from ._args import _c_int  # _args raises the errors defined here
    return _c.polyak_status_name(_c_int(status, "status")).decode()
