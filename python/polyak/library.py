"""The loaded libpolyak: its version, its path, the backends it can run."""
from . import _lib
from ._args import _backend
from ._lib import lib as _c


def version():
    """The loaded libpolyak's version (polyak_version_string: this package's, checked at import)."""
    return _c.polyak_version_string().decode()


def library_path():
    """The path of the loaded libpolyak."""
    return _lib.path


def backend_available(backend):
    """True if this build has `backend` ("cpu" or "cuda") and it can run here."""
    return bool(_c.polyak_backend_available(_backend(backend)))
