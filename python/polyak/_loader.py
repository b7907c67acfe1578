"""Which libpolyak this process loads, and the CUDA libraries it binds.

`pip install .` puts libraries named by what they need next to the package:
libpolyak_cpu.so (the CPU backend alone) and libpolyak_cuda<N>.so (the CUDA
backend too, linked against CUDA N's libcudart.so.N and libcublas.so.N). A
process holds one library per soname, so the CUDA library must be the one for
the CUDA major torch uses: `choose` orders the candidates by file name before
anything is loaded, from torch.version.cuda (read from torch/version.py when
torch is not imported yet: `import polyak` imports no torch) or POLYAK_CUDA
("cpu", "12", "13"). Before loading a CUDA library, `preload` binds the CUDA
libraries and NCCL it needs: those the process has already (torch imported
first), else those of NVIDIA's wheels in this environment, the ones torch
loads, so that torch imported after binds the same ones. A candidate that does
not load (its CUDA runtime missing, one too old) is passed over for the next,
the CPU library last; why is kept in `notes`, which the package adds to the
CUDA backend's "not available" reason.
"""
import ctypes
import glob
import importlib.util
import os
import re
import sys

VARIANT = re.compile(r"^libpolyak_(cpu|cuda([0-9]+))\.(?:so|dylib)$")
# what a CUDA library may need, each before what depends on it
_NEEDED = re.compile(rb"lib(?:cudart|cublasLt|cublas|nccl)\.so\.[0-9]+")
_ORDER = {b"cudart": 0, b"cublasLt": 1, b"cublas": 2, b"nccl": 3}


def variants(directory):
    """{"cpu": path, 12: path, 13: path, ...}: the package's libraries in `directory`, by what they need."""
    found = {}
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
        match = VARIANT.match(name)
        if match:
            found[int(match.group(2)) if match.group(2) else "cpu"] = os.path.join(directory, name)
    return found


def torch_cuda():
    """torch.version.cuda ("12.4"), "" for a torch without CUDA, None without torch; read from the
    imported torch, else from torch/version.py without importing it."""
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "version"):
        return getattr(torch.version, "cuda", None) or ""
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        with open(os.path.join(list(spec.submodule_search_locations)[0], "version.py")) as f:
            text = f.read()
    except OSError:
        return None
    found = re.search(r"^cuda\s*(?::[^=]*)?=\s*(?:['\"]([0-9.]*)['\"]|None)", text, re.M)
    return (found.group(1) or "") if found else None


def _rebuild_hint(major):
    return (f"rebuild polyak for CUDA {major} (pip install . with a CUDA {major} nvcc: CUDACXX=/path/to/nvcc; "
            "docs/pytorch.md)")


def choose(found, cuda, override=None):
    """(candidates, notes): the keys of `found` to try in order and why others are left out, for
    torch's CUDA version `cuda` (torch_cuda()) or the override (POLYAK_CUDA: "cpu" or a major)."""
    majors = sorted((k for k in found if k != "cpu"), reverse=True)
    have = ", ".join(f"CUDA {m}" for m in majors) or "none"
    cpu = ["cpu"] if "cpu" in found else []
    if override:
        if override.strip().lower() == "cpu":
            return cpu, ["POLYAK_CUDA=cpu: the CUDA library is not loaded"]
        if not override.strip().isdigit():
            return cpu, [f"POLYAK_CUDA={override!r} is neither 'cpu' nor a CUDA major such as 12"]
        major = int(override)
        if major in found:
            return [major] + cpu, []
        return cpu, [f"POLYAK_CUDA={override}: this package has no CUDA {major} library (its CUDA libraries: "
                     f"{have})"]
    wanted = re.match(r"([0-9]+)", cuda or "")
    if wanted:
        major = int(wanted.group(1))
        if major in found:
            return [major] + cpu, []
        return cpu, [f"torch is built for CUDA {cuda}, and this package's CUDA libraries are for {have}: "
                     + _rebuild_hint(major)]
    return majors + cpu, []  # no torch, or one without CUDA: any CUDA library whose runtime loads


def _mapped():
    """{file name: path} of the shared libraries mapped in this process."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split(None, 5)[5].strip() for line in f if line.count(" ") >= 5 and "/" in line}
    except OSError:
        return {}
    return {os.path.basename(p): p for p in paths if ".so" in p}


def _wheel_dirs():
    """Where NVIDIA's wheels put their libraries (site-packages/nvidia/*/lib), torch's first."""
    entries = list(sys.path)
    try:
        spec = importlib.util.find_spec("torch") if "torch" not in sys.modules else sys.modules["torch"].__spec__
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        entries.insert(0, os.path.dirname(list(spec.submodule_search_locations)[0]))
    dirs = []
    for entry in entries:
        for found in sorted(glob.glob(os.path.join(entry or ".", "nvidia", "*", "lib"))):
            if found not in dirs:
                dirs.append(found)
    return dirs


def needed(path):
    """The CUDA and NCCL sonames the library at `path` names (its dynamic section's strings)."""
    with open(path, "rb") as f:
        names = set(_NEEDED.findall(f.read()))
    return [n.decode() for n in sorted(names, key=lambda n: _ORDER[n[3:].split(b".")[0]])]


def preload(path):
    """Binds the CUDA libraries and NCCL the library at `path` needs: those mapped in the process
    already (torch's, when torch was imported first) stay; others come from NVIDIA's wheels in
    this environment (the ones torch loads), else the system's search. Returns {soname: path}
    where known; raises OSError naming a soname found nowhere."""
    bound = {}
    mapped = _mapped()
    dirs = None
    for soname in needed(path):
        if soname in mapped:
            bound[soname] = mapped[soname]
            continue
        dirs = _wheel_dirs() if dirs is None else dirs
        candidates = [os.path.join(d, soname) for d in dirs if os.path.isfile(os.path.join(d, soname))]
        try:
            ctypes.CDLL(candidates[0] if candidates else soname, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            raise OSError(f"{soname}, which it needs, did not load ({e})") from None
        bound[soname] = candidates[0] if candidates else soname
    return bound


def load(directory, cuda=None, override=None):
    """(library, path, notes, bound): the first of the package's libraries in `directory` that
    loads, in choose()'s order."""
    found = variants(directory)
    if not found:
        raise ImportError(f"polyak: no libpolyak next to {directory} (libpolyak_cpu.so, libpolyak_cuda<N>.so: "
                          "install the package with `pip install .`, or set POLYAK_LIBRARY to a built libpolyak.so)")
    cuda = torch_cuda() if cuda is None else cuda
    candidates, notes = choose(found, cuda, override)
    for key in candidates:
        path = found[key]
        try:
            bound = preload(path) if key != "cpu" else {}
            return ctypes.CDLL(path), path, notes, bound
        except OSError as e:
            notes.append(f"{os.path.basename(path)} did not load: {e}")
    raise ImportError("polyak: none of the package's libraries loaded: " + "; ".join(notes))
