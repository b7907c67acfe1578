"""_lib: the ctypes mirror of include/polyak.h, in one place.

Every C declaration Python uses is here: the structs (polyak_config field for field)
and the signature of each function. Adding a C call is one line in FUNCTIONS. At
load the library's version and sizeof(polyak_config) must be this package's
(check_library).

The library is one of those bundled with the package (installed next to this
file by `pip install .`: libpolyak_cpu.so and libpolyak_cuda<N>.so, the one
for torch's CUDA picked by _loader.py), or the file named by the environment
variable POLYAK_LIBRARY (a build tree's libpolyak.so, say).
"""
import ctypes
import os

from . import _loader

# The header's enum values and #defines, each under its C name less "POLYAK_" (test_binding.py
# checks every one against the compiler's value, and that none is missing)
MAX_SHADOWS = 8
MAX_NDIM = 8

# polyak_status, polyak_dtype, polyak_backend, polyak_schedule_kind: values pinned by the header
OK, ERR_INVALID_ARG, ERR_STATE, ERR_NO_MEMORY, ERR_UNSUPPORTED = 0, 1, 2, 3, 4
ERR_CUDA, ERR_NCCL, ERR_IO, ERR_FORMAT, ERR_MISMATCH = 5, 6, 7, 8, 9
F32, BF16, F16 = 0, 1, 2
F64, I64, I32, I16, I8, U8, BOOL = 3, 4, 5, 6, 7, 8, 9  # copy-only tensors (polyak_add_copy)
BACKEND_CPU, BACKEND_CUDA = 0, 1
SCHEDULE_CONSTANT, SCHEDULE_TF, SCHEDULE_WARMUP, SCHEDULE_LINEAR = 0, 1, 2, 3
SCHEDULE_COSINE, SCHEDULE_EQUAL, SCHEDULE_POWER = 4, 5, 6
BLEND_ANY_WEIGHTS = 1
SHADOW_ROUND_NEAREST = 1
ROUND_NEAREST, ROUND_STOCHASTIC = 0, 1
TENSOR_CALLERS_SHADOW, TENSOR_COPY = 1, 2
MAX_SNAPSHOTS = 1024
MAX_GRAPH_STEPS = 1 << 22  # polyak_graph_reserve: steps reserved at once
MAX_CPU_THREADS = 256  # polyak_config.cpu_threads: 0..this
SHADOWS_DEVICE, SHADOWS_HOST = 0, 1  # polyak_config.shadow_location
CONFIG_MAGIC = 0x706F6C79  # polyak_config.magic ("poly"), set by polyak_config_init
# the header's constants the package has no use for, and why
NOT_MIRRORED = {
    "POLYAK_CONFIG_SIZE_1_0": "the package passes its own sizeof(polyak_config), which must be the library's",
}


class Schedule(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int), ("beta", ctypes.c_double), ("beta_min", ctypes.c_double),
                ("inv_gamma", ctypes.c_double), ("power", ctypes.c_double), ("gamma", ctypes.c_double),
                ("ramp_steps", ctypes.c_int64), ("start_step", ctypes.c_int64)]


class ShadowConfig(ctypes.Structure):
    """polyak_shadow_config: one shadow's settings."""
    _fields_ = [("schedule", Schedule), ("rounding", ctypes.c_int), ("count_updates", ctypes.c_int),
                ("grad_norm_c", ctypes.c_double), ("layerwise_beta0", ctypes.c_double)]


class Config(ctypes.Structure):
    """polyak_config (1.0)."""
    _fields_ = [("struct_size", ctypes.c_size_t), ("magic", ctypes.c_uint32), ("backend", ctypes.c_int),
                ("device", ctypes.c_int), ("num_shadows", ctypes.c_int), ("shadows", ShadowConfig * MAX_SHADOWS),
                ("shadow_dtype", ctypes.c_int), ("zero_init", ctypes.c_int), ("skip_nonfinite", ctypes.c_int),
                ("seed", ctypes.c_uint64), ("lookahead_every", ctypes.c_int64), ("world_size", ctypes.c_int),
                ("rank", ctypes.c_int), ("nccl_comm", ctypes.c_void_p), ("cpu_threads", ctypes.c_int),
                ("shadow_location", ctypes.c_int)]


class TensorInfo(ctypes.Structure):
    """polyak_tensor_info_t."""
    _fields_ = [("name", ctypes.c_char_p), ("dtype", ctypes.c_int), ("ndim", ctypes.c_int),
                ("shape", ctypes.c_int64 * MAX_NDIM), ("num_elems", ctypes.c_int64), ("shadow_dtype", ctypes.c_int),
                ("flags", ctypes.c_int), ("local_first_elem", ctypes.c_int64), ("local_num_elems", ctypes.c_int64),
                ("reserved_", ctypes.c_int64 * 4)]


class StepState(ctypes.Structure):
    """polyak_step_state: what a checkpoint carries besides the shadows."""
    _fields_ = [("struct_size", ctypes.c_size_t), ("num_shadows", ctypes.c_int), ("shadows_open", ctypes.c_int),
                ("step", ctypes.c_int64),
                ("nonfinite_count", ctypes.c_int64), ("beta_products", ctypes.c_double * MAX_SHADOWS),
                ("update_counts", ctypes.c_int64 * MAX_SHADOWS)]


class View(ctypes.Structure):
    """polyak_view: one named, shaped view of an arena."""
    _fields_ = [("name", ctypes.c_char_p), ("ndim", ctypes.c_int), ("shape", ctypes.c_int64 * MAX_NDIM)]


_vp, _i64, _int, _dbl, _size = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double, ctypes.c_size_t
_str = ctypes.c_char_p
_P = ctypes.POINTER
_status = ctypes.c_int

# name: (restype, [(parameter, argtype), ...]), as include/polyak.h declares them, in its order
# (python/tests/test_binding.py checks names and types against the header)
FUNCTIONS = {
    "polyak_config_init": (None, [("cfg", _P(Config))]),
    "polyak_create": (_status, [("out", _P(_vp)), ("cfg", _P(Config))]),
    "polyak_check_config": (_status, [("cfg", _P(Config)), ("msg", _str), ("msg_num_bytes", _size)]),
    "polyak_status_name": (_str, [("s", _int)]),
    "polyak_last_error": (_str, [("p", _vp)]),
    "polyak_version_string": (_str, []),
    "polyak_backend_available": (_int, [("b", _int)]),
    "polyak_add": (_status, [("p", _vp), ("name", _str), ("param", _vp), ("dtype", _int), ("ndim", _int),
                             ("shape", _P(_i64))]),
    "polyak_finalize": (_status, [("p", _vp), ("stream", _vp)]),
    "polyak_update": (_status, [("p", _vp), ("step", _i64), ("stream", _vp)]),
    "polyak_get_step": (_status, [("p", _vp), ("step", _P(_i64))]),
    "polyak_nonfinite_count": (_status, [("p", _vp), ("count", _P(_i64))]),
    "polyak_num_tensors": (_status, [("p", _vp), ("num_tensors", _P(_int))]),
    "polyak_find_tensor": (_status, [("p", _vp), ("name", _str), ("tensor", _P(_int))]),
    "polyak_get_shadow_n": (_status, [("p", _vp), ("shadow", _int), ("tensor", _int), ("dst", _vp), ("dst_dtype", _int),
                                      ("dst_num_bytes", _size), ("stream", _vp)]),
    "polyak_save": (_status, [("p", _vp), ("path", _str)]),
    "polyak_load": (_status, [("p", _vp), ("path", _str)]),
    "polyak_destroy": (None, [("p", _vp)]),
    "polyak_add_arena": (_status, [("p", _vp), ("base", _vp), ("dtype", _int), ("arena_num_elems", _size),
                                   ("views", _P(View)), ("num_views", _int)]),
    "polyak_add_copy": (_status, [("p", _vp), ("name", _str), ("param", _vp), ("dtype", _int), ("ndim", _int),
                                  ("shape", _P(_i64))]),
    "polyak_add_with_shadow": (_status, [("p", _vp), ("name", _str), ("param", _vp), ("dtype", _int), ("ndim", _int),
                                         ("shape", _P(_i64)), ("shadow", _vp), ("shadow_dtype", _int),
                                         ("flags", _int)]),
    "polyak_tensor_info": (_status, [("p", _vp), ("tensor", _int), ("info", _P(TensorInfo))]),
    "polyak_save_fd": (_status, [("p", _vp), ("fd", _int)]),
    "polyak_load_fd": (_status, [("p", _vp), ("fd", _int)]),
    "polyak_save_size": (_status, [("p", _vp), ("num_bytes", _P(_size))]),
    "polyak_save_to_memory": (_status, [("p", _vp), ("dst", _vp), ("dst_num_bytes", _size),
                                        ("num_bytes_written", _P(_size))]),
    "polyak_load_from_memory": (_status, [("p", _vp), ("src", _vp), ("src_num_bytes", _size)]),
    "polyak_checkpoint_reseal": (_status, [("checkpoint", _vp), ("num_bytes", _size)]),
    "polyak_beta_at": (_dbl, [("s", _P(Schedule)), ("step", _i64)]),
    "polyak_beta_product": (_dbl, [("s", _P(Schedule)), ("last_step", _i64), ("step", _i64)]),
    "polyak_half_life_from_beta": (_dbl, [("beta", _dbl)]),
    "polyak_beta_from_half_life": (_dbl, [("half_life_steps", _dbl)]),
    "polyak_window_from_beta": (_dbl, [("beta", _dbl)]),
    "polyak_beta_from_window": (_dbl, [("window_steps", _dbl)]),
    "polyak_beta_from_horizon": (_dbl, [("horizon_steps", _dbl)]),
    "polyak_sigma_rel_from_gamma": (_dbl, [("gamma", _dbl)]),
    "polyak_gamma_from_sigma_rel": (_dbl, [("sigma_rel", _dbl)]),
    "polyak_copy_to_params": (_status, [("p", _vp), ("shadow", _int), ("stream", _vp)]),
    "polyak_store": (_status, [("p", _vp), ("stream", _vp)]),
    "polyak_restore": (_status, [("p", _vp), ("stream", _vp)]),
    "polyak_discard_store": (_status, [("p", _vp)]),
    "polyak_blend_to_params": (_status, [("p", _vp), ("weights", _P(_dbl)), ("flags", _int), ("stream", _vp)]),
    "polyak_get_blend_n": (_status, [("p", _vp), ("weights", _P(_dbl)), ("flags", _int), ("tensor", _int), ("dst", _vp),
                                     ("dst_dtype", _int), ("dst_num_bytes", _size), ("stream", _vp)]),
    "polyak_hard_update": (_status, [("p", _vp), ("shadow", _int), ("stream", _vp)]),
    "polyak_set_grad_norm": (_status, [("p", _vp), ("grad_norm", _vp)]),
    "polyak_get_beta_product": (_status, [("p", _vp), ("shadow", _int), ("beta_product", _P(_dbl))]),
    "polyak_set_grads": (_status, [("p", _vp), ("grads", _P(_vp))]),
    "polyak_set_layer_norms": (_status, [("p", _vp), ("norms", _vp)]),
    "polyak_get_layer_betas": (_status, [("p", _vp), ("shadow", _int), ("betas", _P(_dbl))]),
    "polyak_posthoc_coefficients": (_status, [("num_snapshots", _int), ("snapshot_steps", _P(_i64)),
                                              ("snapshot_sigma_rels", _P(_dbl)), ("step", _i64), ("sigma_rel", _dbl),
                                              ("coefficients", _P(_dbl))]),
    "polyak_snapshot_elems": (_status, [("p", _vp), ("num_elems", _P(_i64))]),
    "polyak_snapshot": (_status, [("p", _vp), ("shadow", _int), ("dst", _vp), ("stream", _vp)]),
    "polyak_synthesize_to_params": (_status, [("p", _vp), ("snapshots", _vp), ("num_snapshots", _int),
                                              ("coefficients", _P(_dbl)), ("stream", _vp)]),
    "polyak_graph_reserve": (_status, [("p", _vp), ("first_step", _i64), ("num_steps", _i64), ("stream", _vp)]),
    "polyak_graph_update": (_status, [("p", _vp), ("stream", _vp)]),
    "polyak_graph_release": (_status, [("p", _vp), ("num_steps_done", _P(_i64))]),
    "polyak_cpu_isa": (_status, [("p", _vp), ("isa", _P(_str))]),
    "polyak_local_range": (_status, [("p", _vp), ("tensor", _int), ("first_elem", _P(_i64)), ("num_elems", _P(_i64))]),
    "polyak_get_local_shadow_n": (_status, [("p", _vp), ("shadow", _int), ("tensor", _int), ("dst", _vp),
                                            ("dst_dtype", _int), ("dst_num_bytes", _size), ("stream", _vp)]),
    "polyak_save_shards": (_status, [("p", _vp), ("dir", _str)]),
    "polyak_load_shards": (_status, [("p", _vp), ("dir", _str)]),
    "polyak_shadow_data": (_status, [("p", _vp), ("shadow", _int), ("tensor", _int), ("data", _P(_vp)),
                                     ("dtype", _P(_int)), ("num_elems", _P(_i64))]),
    "polyak_get_step_state": (_status, [("p", _vp), ("state", _P(StepState))]),
    "polyak_begin_shadow_write": (_status, [("p", _vp)]),
    "polyak_set_step_state": (_status, [("p", _vp), ("state", _P(StepState))]),
    "polyak_set_offload_staging": (_status, [("p", _vp), ("num_bytes", _size)]),
    "polyak_overlap_param_reads": (_status, [("p", _vp), ("overlap", _int)]),
    "polyak_wait_param_reads": (_status, [("p", _vp), ("stream", _vp)]),
}

# The header's functions deliberately not bound, and why (test_binding.py fails on any other)
UNBOUND = {
    "polyak_get_shadow": "trusts dst's size; the package reads out through polyak_get_shadow_n",
    "polyak_get_local_shadow": "trusts dst's size; the package reads out through polyak_get_local_shadow_n",
    "polyak_get_blend": "trusts dst's size; the package reads out through polyak_get_blend_n",
}


def library_path():
    """$POLYAK_LIBRARY, or None: the package's own libraries, one picked by _loader.load."""
    return os.environ.get("POLYAK_LIBRARY") or None


def package_version():
    """This package's version, from the repository's VERSION file (the one place it is written):
    polyak/_version.py, made from it by `pip install .`, or in a source checkout the file itself."""
    try:
        from ._version import version
        return version
    except ImportError:
        pass
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "VERSION")
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        raise ImportError(f"polyak: no version: neither polyak/_version.py (made by `pip install .`) nor "
                          f"{os.path.normpath(path)} (a source checkout)") from None


def config_size(library):
    """sizeof(polyak_config) in `library`: the struct_size its polyak_config_init writes, into a
    buffer with room for a larger struct than this package's mirror."""
    buffer = (ctypes.c_char * 4096)()
    library.polyak_config_init(ctypes.cast(buffer, ctypes.POINTER(Config)))
    return ctypes.c_size_t.from_buffer(buffer).value


def check_library(library, path, version):
    """Refuses a libpolyak other than the one this package mirrors: its version string and its
    sizeof(polyak_config) must be this package's, or the structs and calls may not agree."""
    found = library.polyak_version_string().decode()
    if found != version:
        raise ImportError(f"polyak: the library {path} is version {found}, this package {version}: load the "
                          "library built with the package (`pip install .` builds both; POLYAK_LIBRARY names "
                          "another)")
    size = config_size(library)
    if size != ctypes.sizeof(Config):
        raise ImportError(f"polyak: the library {path} (version {found}) has a polyak_config of {size} bytes, "
                          f"this package's mirror {ctypes.sizeof(Config)}: they were built from different headers")


def config_defaults(library):
    """polyak_config_init's defaults, in this package's mirror of the struct (the library's own
    layout: check_library has compared them)."""
    cfg = Config()
    library.polyak_config_init(ctypes.byref(cfg))
    return cfg


def _load():
    """(library, path, notes): POLYAK_LIBRARY's library as it is, or the package's own for the CUDA
    torch uses (_loader.py; notes say why a CUDA library was left out)."""
    path = library_path()
    if path:
        notes = []
        try:
            _loader.preload(path)
        except OSError as e:  # the dynamic linker may still find it; if not, CDLL says so
            notes.append(str(e))
        library = ctypes.CDLL(path)
    else:
        here = os.path.dirname(os.path.abspath(__file__))
        library, path, notes, _ = _loader.load(here, override=os.environ.get("POLYAK_CUDA"))
    for name, (restype, args) in FUNCTIONS.items():
        fn = getattr(library, name)
        fn.restype = restype
        fn.argtypes = [argtype for _, argtype in args]
    check_library(library, path, VERSION)
    return library, path, notes


VERSION = package_version()
lib, path, notes = _load()
