#!/usr/bin/env bash
# bench/compile_report.sh: registers, stack frames and spills of every
# kernel (kernels/*.cu), and the fused update's 16-byte global accesses, for
# sm_90 (or the architecture given). Needs nvcc, not a GPU. Fails if any
# kernel spills or has a stack frame (local memory in every thread: an array
# indexed by a variable, or registers spilled).
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
demangle=cat
command -v c++filt >/dev/null 2>&1 && demangle=c++filt
echo "kernels, $arch, $(nvcc --version | tail -1)"
for source in kernels/*.cu; do
  name=$(basename "$source" .cu)
  nvcc "${flags[@]}" -Xptxas -v -c "$source" -o "$tmp/$name.o" 2>"$tmp/$name.ptxas.txt"
  cat "$tmp/$name.ptxas.txt" >>"$tmp/ptxas.txt"
done
# one line per kernel: name, registers, stack frame, spills
awk -v q="'" '
  /Compiling entry function/ { split($0, part, q); kernel = part[2] }
  /bytes stack frame/ { stack = $1; spill_stores = $5; spill_loads = $9 }
  /Used [0-9]+ registers/ {
    for (i = 1; i <= NF; i++) if ($i == "Used") registers = $(i + 1)
    printf "%s\t%s registers, %s bytes stack frame, %s bytes spill stores, %s bytes spill loads\n", kernel, registers, stack, spill_stores, spill_loads
  }' "$tmp/ptxas.txt" | $demangle | sed -E 's/^void //; s/^([^(]*)\([^\t]*\t/\1\t/' | sort | column -t -s "$(printf '\t')"
nvcc "${flags[@]}" -ptx kernels/update.cu -o "$tmp/update.ptx"
echo "16-byte global loads and stores in the update's PTX:"
grep -oE "(ld|st)\.global[a-z.]*\.v4\.(u32|b32|f32)|(ld|st)\.global[a-z.]*\.v2\.(u64|b64)" \
  "$tmp/update.ptx" | sort | uniq -c
if grep -qE "[1-9][0-9]* bytes (spill|stack)" "$tmp/ptxas.txt"; then
  echo "SPILLS OR STACK FRAMES: see above"
  exit 1
fi
echo "no spills, no stack frames"
