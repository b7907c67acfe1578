"""The loaded libpolyak: its version, its path, the backends it can run and why not."""
import ctypes

from . import _lib
from ._args import _backend
from ._lib import lib as _c


def version():
    """The loaded libpolyak's version (polyak_version_string: this package's, checked at import)."""
    return _c.polyak_version_string().decode()


def library_path():
    """The path of the loaded libpolyak (the package's libpolyak_cpu.so or libpolyak_cuda<N>.so,
    or POLYAK_LIBRARY's)."""
    return _lib.path


def backend_available(backend):
    """True if this build has `backend` ("cpu" or "cuda") and it can run here."""
    return bool(_c.polyak_backend_available(_backend(backend)))


def backend_reason(backend):
    """Why `backend` ("cpu" or "cuda") cannot run here, "" if it can: polyak_check_config's reason
    for a handle on it (for CUDA, which CUDA versions cudaDriverGetVersion and
    cudaRuntimeGetVersion report where there is no usable device), and why the package loaded no
    CUDA library, where it did not (its CUDA runtime missing, a torch for another CUDA major)."""
    cfg = _lib.config_defaults(_c)
    cfg.backend = _backend(backend)
    message = ctypes.create_string_buffer(512)
    if _c.polyak_check_config(ctypes.byref(cfg), message, len(message)) == _lib.OK:
        return ""
    return _with_load_notes(cfg.backend, message.value.decode("utf-8", "replace"))


def _with_load_notes(backend, message):
    """message, and for the CUDA backend why the package left its CUDA libraries out (if it did)."""
    if backend != _lib.BACKEND_CUDA or not _lib.notes:
        return message
    return "; ".join(_lib.notes) + f" (so the package loaded {_lib.path}: {message})"
