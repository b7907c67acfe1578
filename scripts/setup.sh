# scripts/setup.sh: sourced by scripts/demo.sh and scripts/test.sh.
# Finds or installs what the build needs, then offers polyak_build.
#   polyak_build <build dir> [cmake options...]   configure + build

polyak_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# nvcc is optional; the usual toolkit location counts as found
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi

# The Debian packages missing for a build and its tests; with "fuzz" (the
# whole test command), also what the GPU check's dry run and the fuzzer use.
polyak_missing_packages() {
  local missing=()
  command -v cmake >/dev/null 2>&1 || missing+=(cmake)
  command -v make >/dev/null 2>&1 || missing+=(make)
  command -v cc >/dev/null 2>&1 || missing+=(gcc)
  command -v c++ >/dev/null 2>&1 || missing+=(g++)
  command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
  [ -f /usr/include/gtest/gtest.h ] || [ -f /usr/local/include/gtest/gtest.h ] || missing+=(libgtest-dev)
  [ -f /usr/include/jansson.h ] || missing+=(libjansson-dev)
  [ -f /usr/include/xxhash.h ] || missing+=(libxxhash-dev)
  if [ "${1:-}" = fuzz ]; then
    # the format check (clang-format pinned at 14)
    command -v clang-format-14 >/dev/null 2>&1 || missing+=(clang-format-14)
    # the GPU check's dry run: Ninja, and GoogleTest's sources for .deps
    command -v ninja >/dev/null 2>&1 || missing+=(ninja-build)
    [ -d /usr/src/googletest ] || missing+=(googletest)
    command -v clang >/dev/null 2>&1 || missing+=(clang)
    compgen -G "/usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a" >/dev/null ||
      missing+=(libclang-rt-14-dev)
  fi
  echo "${missing[@]}"
}

# polyak_install_dependencies [fuzz]
polyak_install_dependencies() {
  local missing
  missing=$(polyak_missing_packages "${1:-}")
  [ -z "$missing" ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing $missing"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing ||
      { echo "setup: apt-get failed" >&2; return 1; }
  else
    echo "setup: missing $missing; install it with:" >&2
    echo "  sudo apt-get install -y $missing" >&2
    return 1
  fi
}

# Prints a python with numpy and safetensors, making .venv if needed;
# fails quietly when python3 or the package registry is missing.
polyak_python_env() {
  local venv="$polyak_root/.venv"
  if ! "$venv/bin/python" -c "import numpy, safetensors" >/dev/null 2>&1; then
    command -v python3 >/dev/null 2>&1 || return 1
    python3 -m venv "$venv" >/dev/null 2>&1 &&
      "$venv/bin/pip" install -q --disable-pip-version-check numpy safetensors >/dev/null 2>&1 ||
      { echo "setup: no numpy/safetensors (no package registry?): the interop test will skip" >&2; return 1; }
  fi
  echo "$venv/bin/python"
}

# Prints a python that also has PyTorch (PyPI's wheel), timm, ema-pytorch,
# diffusers, peft, lightning, transformers and accelerate (the drop-ins'
# side-by-side tests run their trainers), scikit-learn, matplotlib, pytest
# and ruff (the version pyproject.toml requires), and this package installed
# from the work tree with `pip install .` (CPU only, which is quick: the
# tests load the build tree's libpolyak through POLYAK_LIBRARY, with CUDA
# where it was built). Returns 1, quietly, when the registry is unreachable
# (the PyTorch tests then report skipped), and 2 when the package's own
# build fails (a failure).
polyak_torch_env() {
  local venv="$polyak_root/.venv" python log="$polyak_root/.venv/polyak-install.log" ruff
  python=$(polyak_python_env) || return 1
  ruff=$(sed -n 's/^required-version = "==\([0-9.]*\)"$/\1/p' "$polyak_root/pyproject.toml")
  if ! "$python" -c "import torch, timm, ema_pytorch, diffusers, peft, lightning, transformers, accelerate, sklearn, matplotlib, pytest, scikit_build_core" \
      >/dev/null 2>&1 || [ "$("$python" -m ruff --version 2>/dev/null)" != "ruff $ruff" ]; then
    echo "setup: installing PyTorch and the libraries the Python tests compare with into .venv" >&2
    "$venv/bin/pip" install -q --disable-pip-version-check torch timm ema-pytorch diffusers peft lightning \
      transformers accelerate scikit-learn matplotlib pytest "scikit-build-core>=0.10" "ruff==$ruff" >"$log" 2>&1 ||
      { echo "setup: no PyTorch (no package registry?): the Python tests will skip" >&2; return 1; }
  fi
  # the package's own build is a test: its failure is not a missing registry
  POLYAK_WITH_CUDA=OFF "$venv/bin/pip" install -q --disable-pip-version-check --no-deps --no-build-isolation \
    "$polyak_root" >"$log" 2>&1 ||
    { echo "setup: pip install . failed:" >&2; tail -30 "$log" >&2; return 2; }
  echo "$python"
}

polyak_build() {
  local dir=$1
  shift
  cmake -S "$polyak_root" -B "$dir" "$@" >"$dir.configure.log" 2>&1 ||
    { cat "$dir.configure.log" >&2; return 1; }
  grep -E '^-- polyak:' "$dir.configure.log"
  cmake --build "$dir" --parallel "$(nproc)" >"$dir.build.log" 2>&1 ||
    { tail -50 "$dir.build.log" >&2; return 1; }
}
