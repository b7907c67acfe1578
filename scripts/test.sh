#!/usr/bin/env bash
# The tests: the whole suite on the default build (CUDA compiled when nvcc
# is found; GPU tests skip without a device), then every CPU test again in
# a CPU-only build under AddressSanitizer and UndefinedBehaviorSanitizer.
set -euo pipefail
source "$(dirname "$0")/setup.sh"
polyak_install_dependencies
jobs=$(nproc)

echo "== build: default configuration"
mkdir -p "$polyak_root/build"
polyak_build "$polyak_root/build" -DCMAKE_BUILD_TYPE=Release
(cd "$polyak_root/build" && ctest --output-on-failure --parallel "$jobs")

echo "== build: CPU only, -fsanitize=address,undefined"
mkdir -p "$polyak_root/build-sanitize"
polyak_build "$polyak_root/build-sanitize" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DPOLYAK_WITH_CUDA=OFF -DPOLYAK_SANITIZE=ON -DPOLYAK_BUILD_EXAMPLES=OFF
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
(cd "$polyak_root/build-sanitize" && ctest --output-on-failure --parallel "$jobs")
echo "== all tests passed"
