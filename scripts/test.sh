#!/usr/bin/env bash
# The tests: the format check (clang-format 14); the whole suite on the
# default build (CUDA compiled when nvcc is found; GPU tests skip without a
# device); every CPU test again in a CPU-only build under AddressSanitizer
# and UndefinedBehaviorSanitizer; the worker pool, the CPU kernel tables and
# the offload's pipeline (its stand-in device) under ThreadSanitizer; the
# checkpoint loader under libFuzzer for 60 s; a dry run of the GPU check
# (bench/gpu_check.sh). Every build treats warnings as errors.
set -euo pipefail
source "$(dirname "$0")/setup.sh"
polyak_install_dependencies fuzz
jobs=$(nproc)

echo "== format: clang-format 14 over every C, C++ and CUDA file"
"$polyak_root/scripts/check_format.sh"

# a local venv: numpy and safetensors for the checkpoint interop test,
# PyTorch and the rest for the Python package's tests; without a package
# registry those tests report themselves skipped
python_args=(-DPOLYAK_TORCH_PYTHON=)
torch_env=0
polyak_python=$(polyak_torch_env) || torch_env=$?
if [ $torch_env = 0 ]; then
  python_args=(-DPOLYAK_PYTHON="$polyak_python" -DPOLYAK_TORCH_PYTHON="$polyak_python")
elif [ $torch_env = 2 ]; then
  exit 1 # the package did not build: a failure, not a skip
elif polyak_python=$(polyak_python_env); then
  python_args+=(-DPOLYAK_PYTHON="$polyak_python")
fi

echo "== build: default configuration"
mkdir -p "$polyak_root/build"
polyak_build "$polyak_root/build" -DCMAKE_BUILD_TYPE=Release -DPOLYAK_WERROR=ON "${python_args[@]}"
(cd "$polyak_root/build" && ctest --output-on-failure --parallel "$jobs")

echo "== build: CPU only, -fsanitize=address,undefined"
mkdir -p "$polyak_root/build-sanitize"
polyak_build "$polyak_root/build-sanitize" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DPOLYAK_WITH_CUDA=OFF -DPOLYAK_SANITIZE=ON -DPOLYAK_WERROR=ON -DPOLYAK_BUILD_EXAMPLES=OFF -DPOLYAK_BUILD_BENCH=OFF \
  "${python_args[@]}"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
(cd "$polyak_root/build-sanitize" && ctest --output-on-failure --parallel "$jobs")

echo "== build: CPU only, -fsanitize=thread: the CPU backend's worker pool, the offload's pipeline"
mkdir -p "$polyak_root/build-tsan"
polyak_build "$polyak_root/build-tsan" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DPOLYAK_WITH_CUDA=OFF -DPOLYAK_SANITIZE_THREAD=ON -DPOLYAK_WERROR=ON -DPOLYAK_BUILD_EXAMPLES=OFF \
  -DPOLYAK_BUILD_BENCH=OFF
# a race report fails the test (TSan exits 66 after reporting)
(cd "$polyak_root/build-tsan" && TSAN_OPTIONS=halt_on_error=1 ctest -R '^(Threads|CpuKernels|CpuIsa|Offload|OffloadModes)\.' --no-tests=error --output-on-failure --parallel "$jobs")

echo "== fuzz: the checkpoint loader, 60 s"
"$polyak_root/fuzz/run.sh" 60

# What a GPU machine runs, up to where it needs the GPU: the dependencies
# unpacked into .deps and used alone, the Ninja build, the GPU test step
# (which must see that no GPU was used), and a summary naming every step.
echo "== the GPU check, dry run"
if ! command -v nvcc >/dev/null 2>&1; then
  echo "no nvcc: the GPU check needs the CUDA toolkit to build; dry run left out"
  echo "== all tests passed"
  exit 0
fi
"$polyak_root/bench/prepare_device_deps.sh"
OUT="$polyak_root/build-gpu/dry-run" "$polyak_root/bench/gpu_check.sh" --dry-run --deadline 2400 | tail -20
for step in configure build gpu-tests racecheck memcheck benchmark vs-torch offload python-gpu cpu-tests; do
  grep -q "^$step " "$polyak_root/build-gpu/dry-run/summary.txt" ||
    { echo "gpu_check --dry-run: no '$step' in its summary" >&2; exit 1; }
done
echo "== all tests passed"
