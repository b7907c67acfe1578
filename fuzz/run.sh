#!/usr/bin/env bash
# fuzz/run.sh [SECONDS]: builds the loader fuzzer with clang (libFuzzer,
# AddressSanitizer, UndefinedBehaviorSanitizer), writes a seed corpus of
# valid and broken checkpoints, and fuzzes the checkpoint loader for SECONDS
# (default 60): every input from memory and from a file at an offset
# (fuzz_load.c). Fails on any crash, leak, sanitizer report or broken
# invariant; prints executions and coverage.
set -euo pipefail
seconds=${1:-60}
root=$(cd "$(dirname "$0")/.." && pwd)
build="$root/build-fuzz"
command -v clang >/dev/null || { echo "fuzz: clang is missing: apt-get install clang" >&2; exit 1; }
mkdir -p "$build"
CC=clang CXX=clang++ cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPOLYAK_FUZZ=ON -DPOLYAK_WERROR=ON \
  -DPOLYAK_WITH_CUDA=OFF -DPOLYAK_BUILD_TESTS=OFF -DPOLYAK_BUILD_EXAMPLES=OFF >"$build.configure.log" 2>&1 ||
  { cat "$build.configure.log" >&2; exit 1; }
cmake --build "$build" --parallel "$(nproc)" --target polyak_fuzz_load polyak_fuzz_corpus \
  >"$build.build.log" 2>&1 || { tail -40 "$build.build.log" >&2; exit 1; }
corpus="$build/corpus"
rm -rf "$corpus" "$build/artifacts"
mkdir -p "$corpus" "$build/artifacts"
"$build/fuzz/polyak_fuzz_corpus" "$corpus"
echo "fuzz: seed corpus of $(ls "$corpus" | wc -l) files; fuzzing polyak_load_from_memory and polyak_load_fd for $seconds s"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
"$build/fuzz/polyak_fuzz_load" -max_total_time="$seconds" -print_final_stats=1 -rss_limit_mb=2048 \
  -dict="$root/fuzz/checkpoint.dict" -artifact_prefix="$build/artifacts/" "$corpus" 2>"$build/fuzz.log" || {
  tail -60 "$build/fuzz.log" >&2
  echo "fuzz: FAILED; the input is in $build/artifacts/" >&2
  exit 1
}
grep -E "^#[0-9]+.*DONE|stat::number_of_executed_units|stat::peak_rss_mb" "$build/fuzz.log" | tail -3
echo "fuzz: no crash"
