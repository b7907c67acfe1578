"""DLPack capsules over memory the library owns (a shadow's piece), for torch.from_dlpack and
any other DLPack consumer, with no copy and no torch import here.

Each capsule holds a DLManagedTensor (DLPack 0.8, the "dltensor" capsule every consumer
takes) whose manager_ctx keeps `owner` alive: the consumer calls the deleter when its tensor
is freed, and only then is the owner released (polyak.Handle defers freeing the shadows until
its last view is gone). One flat, contiguous tensor per capsule: the consumer reshapes it."""
import ctypes

_KDL_CPU, _KDL_CUDA = 1, 2
# DLDataType (code, bits) of the library's dtypes: kDLInt 0, kDLUInt 1, kDLFloat 2, kDLBfloat 4, kDLBool 6
_DL_TYPES = {"f32": (2, 32), "bf16": (4, 16), "f16": (2, 16), "f64": (2, 64), "i64": (0, 64), "i32": (0, 32),
             "i16": (0, 16), "i8": (0, 8), "u8": (1, 8), "bool": (6, 8)}


class _Device(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _Tensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _Device), ("ndim", ctypes.c_int32), ("dtype", _DataType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]


class _Managed(ctypes.Structure):
    pass


_DELETER = ctypes.CFUNCTYPE(None, ctypes.POINTER(_Managed))
_Managed._fields_ = [("dl_tensor", _Tensor), ("manager_ctx", ctypes.c_void_p), ("deleter", _DELETER)]

_live = {}  # id -> (managed, shape, owner): what a capsule's tensor holds until its deleter runs


def _delete(managed):
    entry = _live.pop(managed.contents.manager_ctx or 0, None)
    if entry is not None:
        entry[2]._release_view()


_deleter = _DELETER(_delete)  # one callback for every capsule, alive as long as the module
_new_capsule = ctypes.pythonapi.PyCapsule_New
_new_capsule.restype = ctypes.py_object
_new_capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


def capsule(address, num_elems, dtype, device, owner):
    """A "dltensor" capsule of num_elems elements of `dtype` (the library's name: "f32", ...) at
    `address`; device (type, ordinal) with type "cpu" or "cuda"; owner._release_view() is called
    once when the consumer frees its tensor. The capsule must be consumed (torch.from_dlpack)."""
    code, bits = _DL_TYPES[dtype]
    shape = (ctypes.c_int64 * 1)(num_elems)
    managed = _Managed()
    managed.dl_tensor = _Tensor(address or None, _Device(_KDL_CUDA if device[0] == "cuda" else _KDL_CPU, device[1]),
                                1, _DataType(code, bits, 1), shape, None, 0)
    key = id(managed)
    managed.manager_ctx = key
    managed.deleter = _deleter
    _live[key] = (managed, shape, owner)
    return _new_capsule(ctypes.addressof(managed), b"dltensor", None)
