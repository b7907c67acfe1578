#!/usr/bin/env bash
# bench/gpu_check.sh: the one command to run on a machine with an H100/H200.
#
#   bench/gpu_check.sh [--dry-run] [--full] [--deadline SECONDS] [--only STEP,STEP...]
#
# In order, under one deadline (default 480 s): configure (Ninja, sm_90),
# build the library, the tests and the benchmark; every Gpu.* test, one
# process each (a skip that says "GPU not used" stops the run at once: the
# machine's GPU was not used, and nothing after it would prove anything);
# compute-sanitizer racecheck over the tests that use shared memory and
# memcheck over those that finish in seconds; the benchmark (short form:
# 20 iterations over gpt2-124m, llama2-7b and tiny-10k; its stochastic-
# rounding ratios are repeated after the summary) and the PyTorch
# comparison on two lists; an offloaded EMA in a synthetic training step
# (gpt2-xl and llama2-7b, every 1 and 10 steps); the Python package's GPU tests; the CPU tests,
# if time is left. A step that cannot finish before the deadline is
# skipped. Each step's verdict and
# seconds are appended to $OUT/summary.txt the moment it ends, so a run cut
# short keeps what it did. --full adds the compile report, the whole
# benchmark, the plot and the demo (a longer run: raise --deadline).
# --only runs the named steps (after configure and build), e.g. to rerun
# the ones that failed.
#
# Without a device the run stops after the GPU tests, saying why. With
# --dry-run (what CI runs) that is success, exit 0, once the cpu-tests step
# has run the tests that are programs beside the unit tests (the demo, the
# trainer, the install, the interop writer, the benchmark's CPU section:
# each needs its own target built); a plain run exits 3. Any failed step
# makes the exit status 1. A step cut by the deadline (it got less than its
# own limit) is reported so, not as a failure, and makes the exit status 4
# if nothing failed (rerun it with --only and a longer --deadline).
#
# The commit named in the results: $POLYAK_COMMIT if set, else git's where
# there is a .git, else .deps/commit (bench/prepare_device_deps.sh writes
# it), else "unknown".
#
# Output, in $OUT (default bench/results; build-gpu/dry-run for a dry run):
#   summary.txt                       the steps, verdicts and seconds
#   <date>-<card>-gpu_check.txt       the whole log
#   <date>-<card>.jsonl               the benchmarks' measurements
#
# The GPU machine installs no packages: on a Debian machine run
# bench/prepare_device_deps.sh first and carry ".deps" (GoogleTest's sources,
# jansson and xxHash unpacked). When .deps is there, the build uses it and
# ignores the system's copies, so a dry run here builds as the device does.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

dry_run=0 full=0 deadline=480 only=""
while [ $# -gt 0 ]; do
  case $1 in
  --dry-run) dry_run=1 ;;
  --full) full=1 ;;
  --deadline) deadline=$2; shift ;;
  --only) only=",$2,"; shift ;;
  *) echo "usage: $0 [--dry-run] [--full] [--deadline SECONDS] [--only STEP,STEP...]" >&2; exit 2 ;;
  esac
  shift
done

build=build-gpu
if [ $dry_run = 1 ]; then out=${OUT:-$root/$build/dry-run}; else out=${OUT:-$root/bench/results}; fi
mkdir -p "$out"
[ -x /usr/local/cuda/bin/nvcc ] && export PATH="/usr/local/cuda/bin:$PATH"

card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
card=${card:-no-gpu}
card_file=$(echo "$card" | tr -c 'A-Za-z0-9._\n-' '-' | tr -s '-')
date=$(date -u +%F) # UTC, as the benchmark names its file
if [ -n "${POLYAK_COMMIT:-}" ]; then
  commit=$POLYAK_COMMIT
elif commit=$(git rev-parse --short HEAD 2>/dev/null); then
  [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && commit="$commit+changes"
else # the device gets the working tree without .git
  commit=$(cat .deps/commit 2>/dev/null || echo unknown)
fi
export POLYAK_COMMIT=$commit # the benchmark's and vs_torch.py's rows
log="$out/$date-$card_file-gpu_check.txt"
summary="$out/summary.txt"
exec > >(tee "$log") 2>&1
tee_pid=$!

failed=0
incomplete=0 # a step the deadline cut short
unavailable="" # set by a step whose tool cannot run on this machine
no_gpu=""  # why the GPU went unused, once the GPU tests said so
halted="" # why the steps left are not run
start=$SECONDS
left() { echo $((deadline - (SECONDS - start))); }

record() { # NAME VERDICT SECONDS
  printf '%-22s %-40s %5s s\n' "$1" "$2" "$3" >>"$summary"
}

# step NAME NEEDED_SECONDS MAX_SECONDS FUNCTION...: runs FUNCTION under
# `timeout` (the smaller of MAX and what is left), unless fewer than NEEDED
# seconds are left, --only leaves it out, or the GPU went unused (a dry run
# still runs the steps that need no GPU).
step() {
  local name=$1 needed=$2 max=$3
  shift 3
  if [ -n "$halted" ] && ! { [ $dry_run = 1 ] && [ -n "$no_gpu" ] && [ "$name" = cpu-tests ]; }; then
    record "$name" "not run: $halted" 0
    return 0
  fi
  if [ -n "$only" ] && [[ $only != *",$name,"* ]] && [ "$name" != configure ] && [ "$name" != build ]; then
    return 0
  fi
  local budget
  budget=$(left)
  if [ "$budget" -lt "$needed" ]; then
    record "$name" "skipped: ${budget} s left, needs ${needed}" 0
    return 0
  fi
  local cut=0 # the deadline, not the step's own limit, sets its time
  if [ "$budget" -ge "$max" ]; then budget=$max; else cut=1; fi
  echo
  echo "=== $name (up to $budget s)"
  local begin=$SECONDS
  "$@" "$budget"
  local rc=$?
  local verdict=pass
  if [ -n "$unavailable" ]; then
    verdict="unavailable: $unavailable"
    unavailable=""
  elif [ -n "$no_gpu" ] && [ -z "$halted" ]; then
    verdict="GPU not used: $no_gpu"
    halted="no GPU"
  elif { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && [ $cut = 1 ]; then
    verdict="cut by the deadline after $budget s"
    incomplete=1
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    verdict="timeout"
    failed=1
  elif [ $rc -ne 0 ]; then
    verdict="FAIL (rc $rc)"
    failed=1
  fi
  record "$name" "$verdict" $((SECONDS - begin))
  return $rc
}

# ---- the steps: each takes its time budget in seconds last ----

configure() {
  command -v ninja >/dev/null 2>&1 || { echo "needs ninja (apt-get install ninja-build)"; return 1; }
  local deps=()
  if [ -f .deps/googletest/CMakeLists.txt ] && [ -d .deps/root/usr/include ]; then
    deps=(-DPOLYAK_DEPS_ONLY=ON)
    echo "using .deps (GoogleTest, jansson, xxHash), not the system's"
  fi
  if [ -f "$build/CMakeCache.txt" ] && ! grep -q '^CMAKE_GENERATOR:INTERNAL=Ninja$' "$build/CMakeCache.txt"; then
    rm -rf "$build" # made by another generator
  fi
  timeout "$1" cmake -G Ninja -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
    "${deps[@]}"
}

# every target: ctest's programs beside the unit tests need theirs; then
# whether the CUDA libraries resolve (a missing one fails every test)
build_targets() {
  timeout "$1" cmake --build "$build" --parallel "$(nproc)" || return
  local missing
  missing=$(ldd "$build/tests/polyak_tests" "$build/libpolyak.so" | grep 'not found' | sort -u)
  [ -z "$missing" ] || { echo "libraries not found:"; echo "$missing"; return 1; }
}

gpu_tests() {
  local output="$out/gpu_tests.txt"
  (cd "$build" && timeout "$1" ctest -R '^Gpu\.' -V --timeout 120) >"$output" 2>&1
  local rc=$?
  grep -E '^[0-9]+/[0-9]+ Test|tests passed|tests failed|The following tests|Failed|Skipped' "$output"
  # a skip for lack of a device: the reason is in the test's own output
  local reason
  reason=$(grep -m1 -o 'GPU not used: .*' "$output")
  if [ -n "$reason" ]; then
    no_gpu=${reason#GPU not used: }
    echo "the GPU tests did not use a GPU: $no_gpu"
    return 0
  fi
  # other skips (a test that needs two GPUs, say) are listed, not failures
  grep -A1 -E 'test_cuda\.cu:[0-9]+: Skipped' "$output" | grep -vE '^--$|Skipped$' || true
  grep -q '^The following tests FAILED' "$output" && grep -A40 '^The following tests FAILED' "$output"
  return $rc
}

sanitize() { # TOOL FILTER BUDGET
  local sanitizer output="$out/$1.txt"
  sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/compute-sanitizer/compute-sanitizer)
  timeout "$3" "$sanitizer" --tool "$1" --error-exitcode 1 "$build/tests/polyak_tests" --gtest_filter="$2" \
    >"$output" 2>&1
  local rc=$?
  tail -25 "$output"
  # some sandboxed runtimes refuse the sanitizer: say so, it is no finding
  if grep -q 'Device not supported' "$output"; then
    unavailable="compute-sanitizer says \"Device not supported\" here"
    echo "$1: $unavailable"
    return 0
  fi
  return $rc
}

# racecheck: the update kernel's per-block step broadcast and block sums,
# LAWA's last-block reduction, directly and in graph mode (and the wrapping
# counters under overlapping replays), the initialization's and blends'
# per-shadow arguments in shared memory
racecheck() {
  sanitize racecheck 'Gpu.LayerwiseShadowsMatchTheCpuBackend:Gpu.ReplaysReadTheSourcesSetAtTheirReservation:Gpu.OverlappingReplaysCountEveryLaunchAndLeaveTheCountersWhole:Gpu.BlendsMatchTheCpuBackend:Gpu.MatchesTheCpuBackendForEveryShadowCount' "$1"
}
# memcheck: every GPU test but the large ones and those that probe NCCL
memcheck() {
  sanitize memcheck 'Gpu.*:-Gpu.HundredThousandTinyTensors:Gpu.Bf16TensorBeyond2To31Elements:Gpu.OneRankCommunicator*:Gpu.ACommunicator*:Gpu.ShardedAcrossGpus*' "$1"
}

benchmark() {
  local args=(--gpu-only --out "$out")
  [ $full = 0 ] && args+=(--iters 20 --lists gpt2-124m,llama2-7b,tiny-10k)
  timeout "$1" "$build/bench/polyak_bench" "${args[@]}" | tee "$out/benchmark.txt"
  return "${PIPESTATUS[0]}"
}

# an offloaded EMA (shadows in host memory) in a synthetic training step of
# about 300 ms, every 1 and 10 steps (100 steps at 10, so that 10 folds are
# timed), reads waited for and overlapped
offload_bench() {
  timeout "$1" "$build/bench/polyak_offload_bench" --lists gpt2-xl,llama2-7b --every 1,10 --steps 20 --step-ms 300 \
    --out "$out" | tee "$out/offload.txt"
  return "${PIPESTATUS[0]}"
}

vs_torch() {
  python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null ||
    { echo "no PyTorch with CUDA here"; return 1; }
  local args=(--lib "$build/libpolyak.so" --out "$out/$date-$card_file.jsonl")
  [ $full = 0 ] && args+=(--iters 20 --lists gpt2-124m,resnet50)
  POLYAK_COMMIT=$commit timeout "$1" python3 bench/vs_torch.py "${args[@]}"
}

# the Python package's GPU tests (no host sync, graph replays, CPU bits) on
# this build's library; on a GPU machine a skip is a failure
python_gpu() {
  local output="$out/python_gpu.txt"
  POLYAK_LIBRARY="$root/$build/libpolyak.so" PYTHONPATH="$root/python" PYTHONDONTWRITEBYTECODE=1 \
    timeout "$1" python3 -m pytest -q -rs "$root/python/tests/test_cuda.py" >"$output" 2>&1
  local rc=$?
  tail -15 "$output"
  if grep -q "SKIPPED" "$output"; then
    echo "the Python GPU tests skipped: see $output"
    return 1
  fi
  return $rc
}

# the CPU tests on this machine's cores; in a dry run only those that are
# not unit tests (names without a dot: the programs beside them, the
# Python tests' stubs, the compile report), which the default build's run
# does not prove built here
cpu_tests() {
  local filter='^Gpu\.'
  [ $dry_run = 1 ] && filter='\.'
  (cd "$build" && timeout "$1" ctest -E "$filter" --no-tests=error --parallel "$(nproc)" --timeout 120 \
    --output-on-failure | tail -25)
}
compile_report() { timeout "$1" bash -c 'bench/compile_report.sh sm_80 && bench/compile_report.sh sm_90'; }
plot() { timeout "$1" python3 bench/plot.py "$out/$date-$card_file.jsonl"; }
demo() { timeout "$1" "$build/examples/polyak_demo" 50000; }

# ---- the run ----

mode=$([ $dry_run = 1 ] && echo "dry run" || echo "run")
[ $full = 1 ] && mode="$mode, full"
driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)
echo "# polyak gpu_check: card $card, driver ${driver:-none}, date $date, commit $commit ($mode, deadline $deadline s)" >"$summary"
echo "polyak gpu_check: card '$card', date $date, commit $commit ($mode, deadline $deadline s)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null
nvcc --version 2>/dev/null | tail -2

step configure 20 90 configure || halted="configure did not finish"
step build 60 1200 build_targets || halted=${halted:-"build did not finish"}
step gpu-tests 30 200 gpu_tests
step racecheck 20 90 racecheck
step memcheck 30 150 memcheck
if [ $full = 1 ]; then
  step benchmark 60 600 benchmark
  step vs-torch 60 400 vs_torch
  step plot 10 60 plot
  step compile-report 10 60 compile_report
  step demo 20 60 demo
else
  step benchmark 60 150 benchmark
  step vs-torch 40 100 vs_torch
fi
step offload 60 300 offload_bench
step python-gpu 30 120 python_gpu
step cpu-tests 30 600 cpu_tests

echo
echo "=== summary ($(basename "$summary"); log $(basename "$log"))"
cat "$summary"
# f32 shadows, stochastic rounding against nearest, same run
grep "stochastic rounding" "$out/benchmark.txt" 2>/dev/null
status=$failed
if [ $failed = 0 ] && [ -n "$no_gpu" ]; then
  if [ $dry_run = 1 ]; then
    echo "dry run: everything up to the GPU tests and the CPU programs worked; the GPU tests saw no GPU ($no_gpu)"
  else
    echo "no GPU was used ($no_gpu): this run proves nothing about the CUDA backend"
    status=3
  fi
elif [ $failed = 0 ] && [ $dry_run = 1 ] && [ "$card" = no-gpu ]; then
  echo "dry run: the GPU tests did not run to say whether a GPU was used"
  status=1
elif [ $failed = 0 ] && [ $incomplete = 1 ]; then
  echo "the deadline cut steps short: rerun them with --only and a longer --deadline"
  status=4
fi
exec 1>&- 2>&-
wait "$tee_pid" # the log holds the summary before this script ends
exit $status
