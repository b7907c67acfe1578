"""polyak's exceptions: one PolyakError subclass per C status, raised with polyak_last_error()'s text."""
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


def status_name(status):
    return _c.polyak_status_name(int(status)).decode()
