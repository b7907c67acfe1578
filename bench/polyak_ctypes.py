"""polyak_ctypes: the part of polyak.h that Python reaches through ctypes.

The polyak_config mirror must match the C struct field for field; `python3
polyak_ctypes.py LIB` (a ctest test) checks that against the built library.
"""
import ctypes
import sys

F32, BF16 = 0, 1
BACKEND_CPU, BACKEND_CUDA = 0, 1


class Schedule(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int), ("beta", ctypes.c_double), ("beta_min", ctypes.c_double),
                ("inv_gamma", ctypes.c_double), ("power", ctypes.c_double), ("gamma", ctypes.c_double),
                ("ramp_steps", ctypes.c_int64), ("start_step", ctypes.c_int64)]


class Config(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("backend", ctypes.c_int), ("device", ctypes.c_int),
                ("num_shadows", ctypes.c_int), ("schedules", Schedule * 8), ("shadow_dtype", ctypes.c_int),
                ("zero_init", ctypes.c_int), ("skip_nonfinite", ctypes.c_int), ("seed", ctypes.c_uint64),
                ("world_size", ctypes.c_int), ("rank", ctypes.c_int), ("nccl_comm", ctypes.c_void_p),
                ("count_updates", ctypes.c_int * 8), ("lookahead_every", ctypes.c_int64),
                ("grad_norm_c", ctypes.c_double * 8), ("layerwise_beta0", ctypes.c_double * 8),
                ("rounding", ctypes.c_int * 8), ("cpu_threads", ctypes.c_int)]


class Polyak:
    """The few calls of polyak.h the benchmark needs."""

    def __init__(self, path):
        lib = ctypes.CDLL(path)
        vp, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.polyak_config_init.argtypes = [ctypes.POINTER(Config)]
        lib.polyak_create.argtypes = [ctypes.POINTER(vp), ctypes.POINTER(Config)]
        lib.polyak_add.argtypes = [vp, ctypes.c_char_p, vp, ctypes.c_int, ctypes.c_int, ctypes.POINTER(i64)]
        lib.polyak_finalize.argtypes = [vp, vp]
        lib.polyak_update.argtypes = [vp, i64, vp]
        lib.polyak_get_shadow.argtypes = [vp, ctypes.c_int, ctypes.c_int, vp, ctypes.c_int, vp]
        lib.polyak_last_error.argtypes = [vp]
        lib.polyak_last_error.restype = ctypes.c_char_p
        lib.polyak_destroy.argtypes = [vp]
        self.lib = lib

    def config(self):
        """polyak_config_init's defaults, after checking that the mirror has the C layout."""
        cfg = Config()
        cfg.struct_size = 0
        self.lib.polyak_config_init(ctypes.byref(cfg))
        if cfg.struct_size != ctypes.sizeof(Config):
            raise RuntimeError(f"polyak_config has {cfg.struct_size} bytes in C, {ctypes.sizeof(Config)} here")
        return cfg

    def check(self, status, handle, what):
        if status != 0:
            detail = self.lib.polyak_last_error(handle).decode() if handle else ""
            raise RuntimeError(f"{what}: status {status}: {detail}")

    def handle(self, params, backend, stream, beta, shadow_dtype=F32, cpu_threads=1):
        """A finalized one-shadow handle (CONSTANT beta) over the torch tensors `params`."""
        cfg = self.config()
        cfg.backend = backend
        cfg.schedules[0].beta = beta
        cfg.shadow_dtype = shadow_dtype
        cfg.cpu_threads = cpu_threads
        h = ctypes.c_void_p()
        self.check(self.lib.polyak_create(ctypes.byref(h), ctypes.byref(cfg)), None, "polyak_create")
        for i, p in enumerate(params):
            shape = (ctypes.c_int64 * max(p.dim(), 1))(*p.shape)
            dtype = F32 if p.element_size() == 4 else BF16  # torch tensors: f32 or bf16
            self.check(self.lib.polyak_add(h, f"t{i}".encode(), p.data_ptr(), dtype, p.dim(), shape), h, "polyak_add")
        self.check(self.lib.polyak_finalize(h, stream), h, "polyak_finalize")
        return h




if __name__ == "__main__":
    lib = Polyak(sys.argv[1])
    cfg = lib.config()
    assert cfg.world_size == 1 and cfg.num_shadows == 1 and cfg.schedules[7].beta == 0.999, "defaults differ"
    print(f"polyak_config mirror: {ctypes.sizeof(Config)} bytes, as in C")
