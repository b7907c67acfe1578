#!/usr/bin/env bash
# The tests: the whole suite on the default build (CUDA compiled when nvcc
# is found; GPU tests skip without a device), then every CPU test again in
# a CPU-only build under AddressSanitizer and UndefinedBehaviorSanitizer,
# then the checkpoint loader under libFuzzer for 60 s.
set -euo pipefail
source "$(dirname "$0")/setup.sh"
polyak_install_dependencies fuzz
jobs=$(nproc)

# a local venv: numpy and safetensors for the checkpoint interop test,
# PyTorch and the rest for the Python package's tests; without a package
# registry those tests report themselves skipped
python_args=(-DPOLYAK_TORCH_PYTHON=)
if polyak_python=$(polyak_torch_env); then
  python_args=(-DPOLYAK_PYTHON="$polyak_python" -DPOLYAK_TORCH_PYTHON="$polyak_python")
elif polyak_python=$(polyak_python_env); then
  python_args+=(-DPOLYAK_PYTHON="$polyak_python")
fi

echo "== build: default configuration"
mkdir -p "$polyak_root/build"
polyak_build "$polyak_root/build" -DCMAKE_BUILD_TYPE=Release "${python_args[@]}"
(cd "$polyak_root/build" && ctest --output-on-failure --parallel "$jobs")

echo "== build: CPU only, -fsanitize=address,undefined"
mkdir -p "$polyak_root/build-sanitize"
polyak_build "$polyak_root/build-sanitize" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DPOLYAK_WITH_CUDA=OFF -DPOLYAK_SANITIZE=ON -DPOLYAK_BUILD_EXAMPLES=OFF -DPOLYAK_BUILD_BENCH=OFF \
  "${python_args[@]}"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
(cd "$polyak_root/build-sanitize" && ctest --output-on-failure --parallel "$jobs")

echo "== fuzz: the checkpoint loader, 60 s"
"$polyak_root/fuzz/run.sh" 60
echo "== all tests passed"
