#!/usr/bin/env bash
# scripts/check_format.sh: every tracked C, C++ and CUDA file is formatted as
# .clang-format says, by clang-format 14 (pinned: other versions format some
# constructs differently). Fails listing the files and lines to fix; to fix
# them: clang-format-14 -i FILE...
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
formatter=clang-format-14
command -v "$formatter" >/dev/null 2>&1 ||
  { echo "check_format: $formatter is missing: apt-get install clang-format-14" >&2; exit 1; }
case "$("$formatter" --version)" in
  *"version 14."*) ;;
  *) echo "check_format: $formatter is not clang-format 14: $("$formatter" --version)" >&2; exit 1 ;;
esac
mapfile -t files < <(git ls-files '*.c' '*.h' '*.cpp' '*.cu' '*.cuh' 2>/dev/null ||
  find include src kernels tests bench fuzz examples -name '*.[ch]' -o -name '*.cpp' -o -name '*.cu')
"$formatter" --dry-run --Werror "${files[@]}"
echo "check_format: ${#files[@]} files formatted as .clang-format says"
