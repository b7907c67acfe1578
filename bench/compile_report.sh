#!/usr/bin/env bash
# bench/compile_report.sh: registers, spills and 16-byte global accesses of
# the fused update kernel for sm_90 (or the architecture given). Needs nvcc,
# not a GPU. Fails if any entry spills.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x /usr/local/cuda/bin/nvcc ] && export PATH="/usr/local/cuda/bin:$PATH"
arch=${1:-sm_90}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# polyak.h includes the version header CMake makes from VERSION: make it here
IFS=. read -r major minor patch <VERSION
sed -e "s/@PROJECT_VERSION_MAJOR@/$major/; s/@PROJECT_VERSION_MINOR@/$minor/; s/@PROJECT_VERSION_PATCH@/$patch/" \
  -e "s/@PROJECT_VERSION@/$major.$minor.$patch/" include/polyak_version.h.in >"$tmp/polyak_version.h"
flags=(-std=c++17 -O3 --fmad=false "-arch=$arch" -Iinclude "-I$tmp" -Ikernels)
echo "update kernel, $arch, $(nvcc --version | tail -1)"
nvcc "${flags[@]}" -Xptxas -v -c kernels/update.cu -o "$tmp/update.o" 2>"$tmp/ptxas.txt"
grep -E "Compiling entry|spill|registers" "$tmp/ptxas.txt"
nvcc "${flags[@]}" -ptx kernels/update.cu -o "$tmp/update.ptx"
echo "16-byte global loads and stores in its PTX:"
grep -oE "(ld|st)\.global[a-z.]*\.v4\.(u32|b32|f32)|(ld|st)\.global[a-z.]*\.v2\.(u64|b64)" \
  "$tmp/update.ptx" | sort | uniq -c
if grep -qE "[1-9][0-9]* bytes spill" "$tmp/ptxas.txt"; then
  echo "SPILLS: see above"
  exit 1
fi
echo "no spills"
