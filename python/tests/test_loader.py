"""Which of the package's libraries loads (python/polyak/_loader.py): the choice for a torch of each CUDA
major (fake torch.version.cuda values, and fake torch packages that must not be imported), a CUDA
library whose runtime is missing passed over for the CPU one with the reason kept, the CUDA libraries
and NCCL bound where torch finds its own."""
import os
import shutil
import subprocess
import sys

import pytest

import polyak
from polyak import _lib, _loader

PACKAGE = os.path.dirname(os.path.abspath(polyak.__file__))
BUILT = os.environ.get("POLYAK_LIBRARY") or _lib.path  # a real libpolyak, standing in for any variant


def files(*keys):
    return {k: f"/x/libpolyak_{k if k == 'cpu' else f'cuda{k}'}.so" for k in keys}


@pytest.mark.parametrize("cuda,expected", [("12.4", [12, "cpu"]), ("12.9", [12, "cpu"]), ("13.0", [13, "cpu"]),
                                           ("13.2", [13, "cpu"]), ("", [13, 12, "cpu"]), (None, [13, 12, "cpu"])])
def test_the_cuda_library_for_torchs_cuda_major_comes_first(cuda, expected):
    assert _loader.choose(files("cpu", 12, 13), cuda) == (expected, [])


def test_a_torch_for_a_cuda_major_the_package_lacks_gets_the_cpu_library_and_the_reason():
    candidates, notes = _loader.choose(files("cpu", 13), "12.1")
    assert candidates == ["cpu"]
    assert "torch is built for CUDA 12.1, and this package's CUDA libraries are for CUDA 13" in notes[0]
    assert "rebuild polyak for CUDA 12" in notes[0] and "CUDACXX" in notes[0]
    assert "for none" in _loader.choose(files("cpu"), "11.8")[1][0]


def test_polyak_cuda_overrides_the_choice():
    found = files("cpu", 12, 13)
    assert _loader.choose(found, "13.0", "cpu") == (["cpu"], ["POLYAK_CUDA=cpu: the CUDA library is not loaded"])
    assert _loader.choose(found, "13.0", "12") == ([12, "cpu"], [])
    candidates, notes = _loader.choose(files("cpu", 13), None, "12")
    assert candidates == ["cpu"] and "no CUDA 12 library" in notes[0]
    assert "neither" in _loader.choose(found, None, "twelve")[1][0]


def test_variants_are_found_by_file_name(tmp_path):
    for name in ("libpolyak_cpu.so", "libpolyak_cuda12.so", "libpolyak_cuda13.so", "libpolyak.so", "notes.txt",
                 "libpolyak_cuda.so", "libpolyak_cuda12.so.bak"):
        (tmp_path / name).write_bytes(b"")
    assert _loader.variants(str(tmp_path)) == {"cpu": str(tmp_path / "libpolyak_cpu.so"),
                                               12: str(tmp_path / "libpolyak_cuda12.so"),
                                               13: str(tmp_path / "libpolyak_cuda13.so")}


# ---- the package as installed, in a new interpreter -----------------------------------------------
def fake_torch(root, cuda):
    """A torch package whose import fails (polyak must not import it), with torch/version.py saying `cuda`."""
    pkg = root / "torch"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('the fake torch was imported')\n")
    value = "None" if cuda is None else repr(cuda)
    (pkg / "version.py").write_text(f"from typing import Optional\n__version__ = '2.9.0'\n"
                                    f"cuda: Optional[str] = {value}\n")
    return root


def needs_cudart12(tmp_path):
    """A shared library that needs libcudart.so.12, as a CUDA 12 libpolyak does, where none is."""
    cc = shutil.which("cc")
    if not cc:
        pytest.skip("no C compiler")
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "a.c").write_text("int cudaRuntimeGetVersion(int *v) { *v = 12040; return 0; }\n")
    subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libcudart.so.12", "-o", stub / "libcudart.so.12",
                    stub / "a.c"], check=True)
    (stub / "b.c").write_text("int cudaRuntimeGetVersion(int *);\n"
                              "int f(void) { int v; return cudaRuntimeGetVersion(&v); }\n")
    out = tmp_path / "libpolyak_cuda12.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", out, stub / "b.c", "-L", stub, "-l:libcudart.so.12"], check=True)
    shutil.rmtree(stub)
    return out


def installed(tmp_path, libraries, torch_cuda="absent", env=None, code=None):
    """Runs `code` (default: prints the loaded library and the CUDA backend's reason) on a copy of the
    package holding `libraries` ({file name: source}), beside a fake torch."""
    pkg = tmp_path / "site" / "polyak"
    shutil.copytree(PACKAGE, pkg, ignore=shutil.ignore_patterns("__pycache__", "*.so*"))
    if not (pkg / "_version.py").exists():
        (pkg / "_version.py").write_text(f"version = {polyak.__version__!r}\n")
    for name, source in libraries.items():
        os.symlink(source, pkg / name)
    path = [str(tmp_path / "site")]
    if torch_cuda != "absent":
        path.append(str(fake_torch(tmp_path / "torch", torch_cuda)))
    code = code or ("import sys, polyak\nprint(polyak.library_path())\nprint(polyak.backend_reason('cuda'))\n"
                    "print('torch' in sys.modules)")
    environ = {k: v for k, v in os.environ.items() if k not in ("POLYAK_LIBRARY", "PYTHONPATH", "POLYAK_CUDA")}
    environ.update(PYTHONPATH=os.pathsep.join(path), PYTHONNOUSERSITE="1", **(env or {}))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_beside_a_cuda_12_torch_the_cuda_12_library_is_chosen_and_its_missing_runtime_reported(tmp_path):
    cuda12 = needs_cudart12(tmp_path)
    path, reason, imported = installed(tmp_path, {"libpolyak_cpu.so": BUILT, "libpolyak_cuda12.so": cuda12,
                                                  "libpolyak_cuda13.so": BUILT}, torch_cuda="12.4")
    assert path.endswith("polyak/libpolyak_cpu.so") and imported == "False"
    assert "libpolyak_cuda12.so did not load: libcudart.so.12, which it needs, did not load" in reason


def test_beside_a_cuda_13_torch_the_cuda_13_library_loads(tmp_path):
    path, _, imported = installed(tmp_path, {"libpolyak_cpu.so": BUILT, "libpolyak_cuda13.so": BUILT},
                                  torch_cuda="13.0")
    assert path.endswith("polyak/libpolyak_cuda13.so") and imported == "False"


def test_a_torch_without_a_matching_library_and_the_override_leave_the_cpu_library_with_the_reason(tmp_path):
    libraries = {"libpolyak_cpu.so": BUILT, "libpolyak_cuda13.so": BUILT}
    path, reason, _ = installed(tmp_path / "a", libraries, torch_cuda="11.8")
    assert path.endswith("libpolyak_cpu.so") and "torch is built for CUDA 11.8" in reason
    path, reason, _ = installed(tmp_path / "b", libraries, torch_cuda="13.0", env={"POLYAK_CUDA": "cpu"})
    assert path.endswith("libpolyak_cpu.so") and "POLYAK_CUDA=cpu" in reason
    path, _, _ = installed(tmp_path / "c", libraries)  # no torch: any CUDA library that loads
    assert path.endswith("libpolyak_cuda13.so")


def test_a_handle_on_the_cuda_backend_says_why_it_is_missing(tmp_path):
    code = ("import polyak\ntry:\n    polyak.Handle(backend='cuda')\nexcept polyak.UnsupportedError as e:\n"
            "    print(e)")
    (message,) = installed(tmp_path, {"libpolyak_cpu.so": BUILT}, torch_cuda="12.4", code=code)
    assert "this package's CUDA libraries are for none" in message


MAPPED = ("import os\n"
          "def mapped(name):\n"
          "    with open('/proc/self/maps') as f:\n"
          "        return sorted({l.split()[-1] for l in f if os.path.basename(l.split()[-1]) == name})\n")


@pytest.mark.parametrize("order", ["polyak, torch", "torch, polyak"])
def test_nccl_and_the_cuda_runtime_are_the_ones_torch_loads_whichever_comes_first(order):
    """A process holds one library per soname: a libpolyak that needs libnccl.so.2 must bind torch's
    (NVIDIA's wheel), not a toolkit's that torch would then bind to as well."""
    torch = pytest.importorskip("torch")
    if "libnccl.so.2" not in _loader.needed(BUILT) or not torch.version.cuda:
        pytest.skip("a library built without NCCL, or a torch without CUDA")
    code = MAPPED + (f"import {order}\n"
                     "print(mapped('libnccl.so.2')); print(mapped('libcudart.so.' + torch.version.cuda.split('.')[0]))")
    environ = {**os.environ, "POLYAK_LIBRARY": BUILT}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ)
    assert out.returncode == 0, out.stderr
    nccl, cudart = ([os.path.realpath(p) for p in eval(line)] for line in out.stdout.splitlines())
    torch_dir = os.path.realpath(os.path.dirname(os.path.dirname(torch.__file__)))
    assert len(nccl) == 1 and len(cudart) == 1, (nccl, cudart)
    if os.path.isdir(os.path.join(torch_dir, "nvidia")):  # torch from PyPI, with NVIDIA's wheels
        assert nccl[0].startswith(torch_dir) and cudart[0].startswith(torch_dir), (nccl, cudart)
