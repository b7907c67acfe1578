"""polyak: averaged copies ("shadows") of a network's parameters, updated in one pass.

A thin layer over libpolyak's C API (include/polyak.h) through ctypes:

    import polyak
    h = polyak.Handle([polyak.Constant(0.999), polyak.Power(sigma_rel=0.05)])
    h.add("w", ptr, "f32", (1024, 1024))      # a pointer to the param's memory
    h.finalize()
    h.update(step)                            # every shadow of every tensor

`import polyak` needs no third-party package and imports no torch;
`polyak.torch` has `EMA(model)` for PyTorch modules. Every failing C call
raises the PolyakError subclass of its status, with polyak_last_error()'s
text; nothing here computes an average itself.
"""
from . import _lib
from ._args import BACKENDS, DTYPE_NAMES, DTYPES, MAX_CPU_THREADS, MAX_SHADOWS, MAX_SNAPSHOTS, ROUNDINGS
from .errors import (
    CudaError,
    FileIOError,
    FormatError,
    InvalidArgError,
    MismatchError,
    NcclError,
    NoMemoryError,
    PolyakError,
    StateError,
    UnsupportedError,
    status_name,
)
from .handle import Handle, TensorInfo
from .library import backend_available, backend_reason, library_path, version
from .schedules import (
    TF,
    Constant,
    Cosine,
    Equal,
    GradNorm,
    Layerwise,
    Linear,
    Lookahead,
    Power,
    Schedule,
    Warmup,
    beta_from_half_life,
    beta_from_horizon,
    beta_from_window,
    gamma_from_sigma_rel,
    half_life_from_beta,
    half_life_steps,
    posthoc_coefficients,
    sigma_rel_from_gamma,
    window_from_beta,
)

__version__ = _lib.VERSION  # the repository's VERSION file
__all__ = [
    "PolyakError", "InvalidArgError", "StateError", "NoMemoryError", "UnsupportedError", "CudaError",
    "NcclError", "FileIOError", "FormatError", "MismatchError",
    "Schedule", "Constant", "TF", "Warmup", "Linear", "Cosine", "Equal", "Power", "GradNorm", "Layerwise",
    "Lookahead", "Handle", "TensorInfo", "version", "library_path", "backend_available", "backend_reason",
    "status_name",
    "half_life_from_beta", "half_life_steps", "beta_from_half_life", "window_from_beta", "beta_from_window",
    "beta_from_horizon", "sigma_rel_from_gamma", "gamma_from_sigma_rel", "posthoc_coefficients",
    "MAX_SHADOWS", "MAX_SNAPSHOTS", "MAX_CPU_THREADS", "DTYPES", "DTYPE_NAMES", "ROUNDINGS", "BACKENDS",
]
