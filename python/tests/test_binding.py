"""The ctypes mirror (polyak/_lib.py) against include/polyak.h, so that the two cannot drift.

Three sources are compared: the header's text (parsed here: every struct field, enum value,
object-like #define and POLYAK_API prototype, with its types), the compiler's view of it
(tests/binding/abi_dump.c, built by CMake, named by POLYAK_ABI_DUMP: sizes, offsets, values),
and the mirror. A field, constant or function added, removed, reordered or retyped on one side
only fails a test here, naming it.
"""
import ctypes
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

import polyak
from polyak import _lib

INCLUDE = Path(__file__).resolve().parents[2] / "include"
_P = ctypes.POINTER


# ---- the header, parsed -------------------------------------------------------------------------

def header_text(name="polyak.h"):
    """polyak.h and the headers of include/ it includes, comments removed, lines joined."""
    text = (INCLUDE / name).read_text()
    for included in re.findall(r'#include\s+"([^"]+)"', text):
        if (INCLUDE / included).exists():  # polyak_version.h is made by CMake: abi_dump reports it
            text += "\n" + header_text(included)
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r"//[^\n]*", " ", text)
    return text.replace("\\\n", " ")


def c_type(text):
    """A C type as written ("const polyak_t *", "void *const *") without qualifiers: "polyak_t*"."""
    text = re.sub(r"\bconst\b", " ", text)
    return re.sub(r"\s+", " ", text).replace(" *", "*").replace("* ", "*").strip()


def defines(text):
    """{name: value text} of the object-like POLYAK_ #defines with a value."""
    found = {}
    for name, value in re.findall(r"^[ \t]*#[ \t]*define[ \t]+(POLYAK_\w+)\b(?!\()[ \t]*(.*)$", text, flags=re.M):
        if value.strip() and name != "POLYAK_API":  # POLYAK_API: the export attribute, not a constant
            found[name] = value.strip()
    return found


def function_macros(text):
    return dict(re.findall(r"#[ \t]*define[ \t]+(POLYAK_\w+)\([^)]*\)[ \t]*([^\n]*)", text))


def enums(text):
    """{type name: [member names]}, X-macro lists (polyak_status) expanded."""
    found = {}
    for body, name in re.findall(r"typedef\s+enum\s*\{(.*?)\}\s*(\w+)\s*;", text, flags=re.S):
        macro = re.fullmatch(r"\s*(\w+)\(\w+\)\s*", body)
        if macro:  # POLYAK_STATUS_LIST(POLYAK_STATUS_ENUM_ITEM): the list's X(name, value) items
            body = function_macros(text)[macro.group(1)]
            found[name] = re.findall(r"X\(\s*(\w+)\s*,", body)
        else:
            found[name] = [m.split("=")[0].strip() for m in body.split(",") if m.strip()]
    return found


def structs(text):
    """{type name: [(field name, C type, array length or None)]} in declaration order."""
    found = {}
    for body, name in re.findall(r"typedef\s+struct\s*\{(.*?)\}\s*(\w+)\s*;", text, flags=re.S):
        fields = []
        for declaration in filter(None, (d.strip() for d in body.split(";"))):
            first, *more = declaration.split(",")
            m = re.fullmatch(r"(.*?[\s*])(\w+)\s*(?:\[\s*(\w+)\s*\])?", first.strip(), flags=re.S)
            base = c_type(m.group(1)).rstrip("*")
            fields.append((m.group(2), c_type(m.group(1)), m.group(3)))
            for extra in more:  # "int world_size, rank": the same base type
                e = re.fullmatch(r"(\**)\s*(\w+)\s*(?:\[\s*(\w+)\s*\])?", extra.strip())
                fields.append((e.group(2), base + e.group(1), e.group(3)))
        found[name] = fields
    return found


def prototypes(text):
    """{function name: (return C type, [(parameter name, C type)])} of every POLYAK_API declaration."""
    found = {}
    for ret, name, params in re.findall(r"POLYAK_API\s+([\w\s*]+?)\s*\b(polyak_\w+)\s*\(([^)]*)\)\s*;", text):
        args = []
        if c_type(params) not in ("", "void"):
            for param in params.split(","):
                m = re.fullmatch(r"(.*?[\s*])(\w+)", param.strip(), flags=re.S)
                assert m, f"{name}: cannot read the parameter {param.strip()!r}"
                args.append((m.group(2), c_type(m.group(1))))
        found[name] = (c_type(ret), args)
    return found


HEADER = header_text()
ENUMS = enums(HEADER)
STRUCTS = structs(HEADER)
PROTOTYPES = prototypes(HEADER)

# The one ctypes type each C type of the header is bound as. Memory a call reads or writes on
# the backend's side (float * read-outs and device norms) is an address: c_void_p.
SCALARS = {"int": ctypes.c_int, "int64_t": ctypes.c_int64, "uint32_t": ctypes.c_uint32, "uint64_t": ctypes.c_uint64,
           "size_t": ctypes.c_size_t, "double": ctypes.c_double, "char*": ctypes.c_char_p,
           "char**": _P(ctypes.c_char_p), "void*": ctypes.c_void_p, "float*": ctypes.c_void_p,
           "polyak_t*": ctypes.c_void_p, "polyak_t**": _P(ctypes.c_void_p), "void**": _P(ctypes.c_void_p),
           "int*": _P(ctypes.c_int), "int64_t*": _P(ctypes.c_int64), "size_t*": _P(ctypes.c_size_t),
           "double*": _P(ctypes.c_double)}
MIRRORED_STRUCTS = {"polyak_schedule": _lib.Schedule, "polyak_shadow_config": _lib.ShadowConfig,
                    "polyak_config": _lib.Config, "polyak_view": _lib.View, "polyak_tensor_info_t": _lib.TensorInfo}


def ctypes_of(c):
    """The ctypes type of C type `c`: enums are C ints (abi_dump checks their size)."""
    if c in SCALARS:
        return SCALARS[c]
    if c in ENUMS:
        return ctypes.c_int
    if c in MIRRORED_STRUCTS:
        return MIRRORED_STRUCTS[c]
    if c.endswith("*") and c[:-1] in MIRRORED_STRUCTS:
        return _P(MIRRORED_STRUCTS[c[:-1]])
    raise AssertionError(f"no ctypes type for the C type {c!r}: add it to SCALARS in test_binding.py")


def type_name(t):
    return "None" if t is None else getattr(t, "__name__", repr(t))


# ---- the compiler's view ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def abi():
    path = os.environ.get("POLYAK_ABI_DUMP")
    if not path:
        pytest.skip("POLYAK_ABI_DUMP is not set: ctest sets it to the build's polyak_abi_dump")
    return json.loads(subprocess.run([path], capture_output=True, text=True, check=True).stdout)


def test_the_parser_reads_the_header():
    """Guards the parser itself: what it must find in any version of the header."""
    assert {"polyak_create", "polyak_update", "polyak_config_init", "polyak_destroy"} <= set(PROTOTYPES)
    assert PROTOTYPES["polyak_update"] == ("polyak_status", [("p", "polyak_t*"), ("step", "int64_t"),
                                                             ("stream", "void*")])
    assert ENUMS["polyak_status"][:2] == ["POLYAK_OK", "POLYAK_ERR_INVALID_ARG"]
    assert ("shadows", "polyak_shadow_config", "POLYAK_MAX_SHADOWS") in STRUCTS["polyak_config"]
    assert set(MIRRORED_STRUCTS) == set(STRUCTS), "a public struct without a mirror in _lib.py, or one gone"


# ---- structs --------------------------------------------------------------------------------------

@pytest.mark.parametrize("c_name", sorted(MIRRORED_STRUCTS))
def test_struct_fields_have_the_headers_names_types_and_order(c_name):
    mirror = MIRRORED_STRUCTS[c_name]
    header = [(name, c, length) for name, c, length in STRUCTS[c_name]]
    assert [f[0] for f in mirror._fields_] == [f[0] for f in header], f"{c_name}: the fields differ"
    for (name, c, length), (_, t) in zip(header, mirror._fields_):
        want = ctypes_of(c)
        if length is not None:
            count = int(defines(HEADER).get(length, length).rstrip("uU"))
            assert getattr(t, "_length_", None) == count, f"{c_name}.{name}: {c}[{length}] is {type_name(t)}"
            t = t._type_
        assert t is want, f"{c_name}.{name}: {c} is {type_name(want)} in ctypes, the mirror has {type_name(t)}"


@pytest.mark.parametrize("c_name", sorted(MIRRORED_STRUCTS))
def test_struct_sizes_and_offsets_are_the_compilers(abi, c_name):
    mirror, layout = MIRRORED_STRUCTS[c_name], abi["structs"][c_name]
    assert [f["name"] for f in layout["fields"]] == [f[0] for f in STRUCTS[c_name]], \
        f"tests/binding/abi_dump.c does not list {c_name}'s fields as the header declares them"
    for f in layout["fields"]:
        got = getattr(mirror, f["name"])
        assert (got.offset, got.size) == (f["offset"], f["size"]), (
            f"{c_name}.{f['name']}: offset {f['offset']}, {f['size']} bytes in C; "
            f"offset {got.offset}, {got.size} bytes in the mirror")
    assert (ctypes.sizeof(mirror), ctypes.alignment(mirror)) == (layout["size"], layout["align"]), c_name


def test_enum_types_are_c_ints(abi):
    assert set(abi["enum_sizes"]) == set(ENUMS)
    for name, size in abi["enum_sizes"].items():
        assert size == ctypes.sizeof(ctypes.c_int), f"{name} is {size} bytes: the mirror binds enums as int"


# ---- constants ------------------------------------------------------------------------------------

def test_every_enum_value_and_define_is_mirrored_with_the_compilers_value(abi):
    names = {m for members in ENUMS.values() for m in members} | set(defines(HEADER))
    assert set(abi["constants"]) == names, (
        f"tests/binding/abi_dump.c lacks {sorted(names - set(abi['constants']))} "
        f"and has {sorted(set(abi['constants']) - names)} that the header does not declare")
    for name, value in abi["constants"].items():
        python_name = name.removeprefix("POLYAK_")
        if name in _lib.NOT_MIRRORED:
            assert not hasattr(_lib, python_name), f"{name} is mirrored and listed in NOT_MIRRORED"
            continue
        assert hasattr(_lib, python_name), f"{name} has no _lib.{python_name} (or a reason in NOT_MIRRORED)"
        assert getattr(_lib, python_name) == value, f"{name} is {value} in C, _lib.{python_name} is " \
                                                    f"{getattr(_lib, python_name)}"
    assert set(_lib.NOT_MIRRORED) <= names, "NOT_MIRRORED names a constant the header does not have"


def test_the_errors_carry_the_status_values(abi):
    for cls in polyak.PolyakError.__subclasses__():
        assert abi["constants"][polyak.status_name(cls.status)] == cls.status


def test_the_version_macros_are_the_packages(abi):
    version = abi["version"]
    assert version["POLYAK_VERSION_STRING"] == polyak.__version__ == polyak.version()
    assert version["POLYAK_VERSION_STRING"] == "{POLYAK_VERSION_MAJOR}.{POLYAK_VERSION_MINOR}." \
                                               "{POLYAK_VERSION_PATCH}".format(**version)


# ---- prototypes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PROTOTYPES))
def test_every_prototype_is_bound_with_its_types_or_left_out_with_a_reason(name):
    ret, params = PROTOTYPES[name]
    if name in _lib.UNBOUND:
        assert name not in _lib.FUNCTIONS and _lib.UNBOUND[name].strip(), f"{name}: bound and in UNBOUND"
        return
    assert name in _lib.FUNCTIONS, f"{name} is neither in _lib.FUNCTIONS nor in _lib.UNBOUND (with why)"
    restype, args = _lib.FUNCTIONS[name]
    want = None if ret == "void" else ctypes_of(ret)
    assert restype is want, f"{name} returns {ret}: {type_name(want)}, the binding says {type_name(restype)}"
    assert [a[0] for a in args] == [p[0] for p in params], f"{name}: the parameters' names differ"
    for (arg, c), (_, t) in zip(params, args):
        assert t is ctypes_of(c), f"{name}({arg}): {c} is {type_name(ctypes_of(c))}, the binding says {type_name(t)}"


def test_no_binding_of_a_function_the_header_lacks():
    assert not set(_lib.FUNCTIONS) - set(PROTOTYPES), "bound but not declared in include/polyak.h"
    assert not set(_lib.UNBOUND) - set(PROTOTYPES), "UNBOUND names a function the header lacks"


def test_the_loaded_functions_carry_the_bindings():
    for name, (restype, args) in _lib.FUNCTIONS.items():
        fn = getattr(_lib.lib, name)
        assert fn.restype is restype and list(fn.argtypes) == [t for _, t in args], name
