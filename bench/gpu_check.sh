#!/usr/bin/env bash
# bench/gpu_check.sh: the one command to run on a machine with an H100/H200.
#
# Builds for sm_90, reports registers/spills and the vector width of the
# update kernel, runs the whole ctest suite (GPU tests must run, not skip),
# runs compute-sanitizer memcheck and racecheck over the GPU tests (the
# >2^31-element test left out), runs the benchmark if one is built, and
# prints a short table last, then the benchmark's stochastic-rounding
# ratios. The full log goes to
#   $OUT/<date>-<card>-gpu_check.txt   ($OUT defaults to bench/results)
# with the card as nvidia-smi names it. Bounded to about 8 minutes.
#
# The GPU image installs no packages: on the development machine run
# bench/prepare_device_deps.sh first and carry ".deps" (GoogleTest's
# sources, jansson and xxHash unpacked).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${OUT:-$root/bench/results}
mkdir -p "$out"
[ -x /usr/local/cuda/bin/nvcc ] && export PATH="/usr/local/cuda/bin:$PATH"

card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
card=${card:-no-gpu}
card_file=$(echo "$card" | tr -c 'A-Za-z0-9._\n-' '-' | tr -s '-')
date=$(date +%F)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
log="$out/$date-$card_file-gpu_check.txt"
exec > >(tee "$log") 2>&1
tee_pid=$!

build=build-gpu
jobs=$(nproc)
summary=()
failed=0

# step NAME COMMAND...: runs, times and records one step (external
# commands carry their own `timeout`, so the whole check stays bounded)
step() {
  local name=$1
  shift
  echo
  echo "=== $name"
  local start=$SECONDS
  "$@"
  local rc=$?
  local verdict=pass
  [ $rc -eq 124 ] && verdict="timeout"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && verdict="FAIL (rc $rc)"
  [ $rc -ne 0 ] && failed=1
  summary+=("$(printf '%-34s %-16s %5d s' "$name" "$verdict" $((SECONDS - start)))")
  return $rc
}

echo "polyak gpu_check: card '$card', date $date, commit $commit"
have_gtest=0
{ [ -f /usr/include/gtest/gtest.h ] || [ -f .deps/googletest/CMakeLists.txt ]; } && have_gtest=1
have_jansson=0
{ [ -f /usr/include/jansson.h ] || [ -f .deps/root/usr/include/jansson.h ]; } && have_jansson=1
if [ $have_gtest = 0 ] || [ $have_jansson = 0 ]; then
  echo "missing GoogleTest or jansson/xxHash: run bench/prepare_device_deps.sh on the development"
  echo "machine and carry .deps"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null
nvcc --version | tail -2

step "configure (sm_90)" timeout 30 cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CUDA_ARCHITECTURES=90
step "build" timeout 120 cmake --build "$build" --parallel "$jobs"

step "compile report (no spills)" timeout 30 bench/compile_report.sh sm_90

tests=("$build/tests/polyak_tests")
run_ctest() {
  (cd "$build" && timeout 100 ctest --output-on-failure --timeout 90) | tee /tmp/polyak_ctest.txt
  local rc=${PIPESTATUS[0]}
  if grep -E "Gpu\..*(Skipped|Not Run)" /tmp/polyak_ctest.txt; then
    echo "GPU tests were skipped: this machine's GPU was not used"
    return 1
  fi
  return "$rc"
}
step "ctest (whole suite, GPU tests)" run_ctest

sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/compute-sanitizer/compute-sanitizer)
gpu_filter='Gpu.*:-Gpu.Bf16TensorBeyond2To31Elements'
# racecheck watches shared memory: the update kernel and the LAWA norms kernel use it
race_filter='Gpu.MatchesTheCpuBackendForEveryShadowCount:Gpu.CapturedUpdate*:Gpu.LayerwiseShadowsMatchTheCpuBackend'
step "compute-sanitizer memcheck" timeout 110 "$sanitizer" --tool memcheck --error-exitcode 1 \
  "${tests[0]}" --gtest_filter="$gpu_filter"
step "compute-sanitizer racecheck" timeout 60 "$sanitizer" --tool racecheck --error-exitcode 1 \
  "${tests[0]}" --gtest_filter="$race_filter"

run_bench() {
  timeout 180 "$build/bench/polyak_bench" --gpu-only --out "$out" | tee /tmp/polyak_bench.txt
  return "${PIPESTATUS[0]}"
}
step "benchmark (C)" run_bench
gpu_jsonl=$(ls -t "$out"/*.jsonl 2>/dev/null | head -1)
if python3 -c "import torch" 2>/dev/null; then
  step "benchmark (vs PyTorch)" timeout 150 python3 bench/vs_torch.py --lib "$build/libpolyak.so" \
    --out "$gpu_jsonl"
fi
if [ -n "$gpu_jsonl" ] && python3 -c "import matplotlib" 2>/dev/null; then
  step "plot" timeout 30 python3 bench/plot.py "$gpu_jsonl"
fi
step "demo" timeout 40 "$build/examples/polyak_demo" 50000

echo
echo "=== summary: $card, $date, commit $commit (log: $(basename "$log"))"
printf '%s\n' "${summary[@]}"
grep "stochastic rounding" /tmp/polyak_bench.txt 2>/dev/null # f32 shadows: the ratio to nearest
exec 1>&- 2>&-
wait "$tee_pid" # the log holds the summary before this script ends
exit $failed
