"""DLPack capsules over memory the library owns (a shadow's piece), for torch.from_dlpack and
any other DLPack consumer, with no copy and no torch import here.

Each capsule holds a DLManagedTensor (DLPack 0.8, the "dltensor" capsule every consumer
takes) whose manager_ctx keeps `owner` alive: the consumer calls the deleter when its tensor
is freed, and only then is the owner released (polyak.Handle defers freeing the shadows until
its last view is gone); a capsule freed unconsumed runs the deleter itself. One flat,
contiguous tensor per capsule: the consumer reshapes it."""
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
# the capsule's destructor (the DLPack rule): a capsule still named "dltensor" was never consumed,
# so it runs the managed tensor's deleter; a consumer renames it "used_dltensor" and frees it itself.
# Its argument is the capsule as an address: a py_object would take a reference to a dying object
_DESTRUCTOR = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_is_valid = ctypes.pythonapi.PyCapsule_IsValid
_is_valid.restype = ctypes.c_int
_is_valid.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_get_pointer.restype = ctypes.c_void_p
_get_pointer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]


def _destroy(address):
    if _is_valid(address, b"dltensor"):
        managed = ctypes.cast(_get_pointer(address, b"dltensor"), ctypes.POINTER(_Managed))
        managed.contents.deleter(managed)


_destructor = _DESTRUCTOR(_destroy)
_new_capsule = ctypes.pythonapi.PyCapsule_New
_new_capsule.restype = ctypes.py_object
_new_capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, _DESTRUCTOR]


def capsule(address, num_elems, dtype, device, owner):
    """A "dltensor" capsule of num_elems elements of `dtype` (the library's name: "f32", ...) at
    `address`; device (type, ordinal) with type "cpu" or "cuda"; owner._release_view() is called
    once when the consumer frees its tensor, or when the capsule is freed unconsumed."""
    code, bits = _DL_TYPES[dtype]
    shape = (ctypes.c_int64 * 1)(num_elems)
    managed = _Managed()
    managed.dl_tensor = _Tensor(address or None, _Device(_KDL_CUDA if device[0] == "cuda" else _KDL_CPU, device[1]),
                                1, _DataType(code, bits, 1), shape, None, 0)
    key = id(managed)
    managed.manager_ctx = key
    managed.deleter = _deleter
    _live[key] = (managed, shape, owner)
    return _new_capsule(ctypes.addressof(managed), b"dltensor", _destructor)
