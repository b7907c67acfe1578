"""polyak against what PyTorch users run today, on the same tensor lists, card and run.

Implementations (K = 1 shadow, decay 0.999), f32 shadows unless named:
  polyak                 polyak.torch.EMA.update on a module holding the list (the package, one C call;
                         it checks first that no param moved or changed its strides or size)
  polyak_unchecked       the same with check_stale=False: the C call alone
  polyak_bf16_shadows    EMA.update with shadow_dtype=torch.bfloat16 (stochastic rounding), bf16 params
  torch_foreach_lerp     torch._foreach_lerp_ (timm ModelEmaV3, AveragedModel): f32 params and shadows
  torch_cast_then_lerp   bf16 params cast to f32, then _foreach_lerp_ into f32 shadows
  timm_v3                timm.utils.ModelEmaV3.update on a module holding the list (if timm imports):
                         f32 params; bf16 params with dtype=torch.float32 (its mixed-dtype path,
                         _foreach_mul_ then _foreach_add_); timm_v3_bf16_sr: bf16 params and a
                         bf16 EMA, its stochastic rounding
  torch_loop             per tensor shadow.mul_(beta).add_(param, alpha=1-beta)
Before timing, each implementation's result after one update is checked against
float64. On a GPU every update is timed between CUDA events (median of --iters),
one implementation after another; the host wall time per call is reported too.
On the CPU (--device cpu) both are the wall time, at each of --threads
(torch.set_num_threads for PyTorch and timm, EMA(cpu_threads=) for polyak), the
implementations of a list and param dtype taking turns, one update each, so that
the machine's drifting bandwidth affects them alike; "of copy" is of the same
run's torch copy_ at that thread count. The ratios the project aims at are
printed after each list. Results are appended to --out as JSON lines in the C
benchmark's format, with "host_ms_median" (and on the CPU "threads") added.

Usage: vs_torch.py [--lib build/libpolyak.so] [--out FILE.jsonl] [--lists a,b] [--iters N]
                   [--device cpu] [--threads 1,2]
--lib (or POLYAK_LIBRARY) picks a built library and imports the package from this
checkout's python/, the sources beside it; without either, the installed package with
its own library (python/ where none is installed).
"""
import argparse
import datetime
import importlib.util
import inspect
import json
import os
import statistics
import subprocess
import sys
import time

import torch

BETA = 0.999
HERE = os.path.dirname(os.path.abspath(__file__))
EMA = None  # polyak.torch.EMA, imported by main() once the library is chosen


def tensor_sizes(name):
    """Element counts of a list: bench/models/<name>.tsv, or tiny-10k as bench/model_list.c makes it."""
    if name == "ones-1k":  # 1000 one-element tensors: the per-call host cost, next to no data
        return [1] * 1000
    if name in ("tiny-10k", "tiny-1k"):  # tiny-1k: the first 1000 of tiny-10k (host cost per call)
        state, sizes = 10000, []
        for _ in range(10000 if name == "tiny-10k" else 1000):
            state = (state * 6364136223846793005 + 1442695040888963407) % (1 << 64)
            sizes.append(1 + (state >> 33) % 4096)
        return sizes
    sizes = []
    for line in open(os.path.join(HERE, "models", name + ".tsv")):
        if line.strip() and not line.startswith("#"):
            sizes.append(int(line.split()[2]))
    return sizes


def timed(fn, iters, device):
    """Median device ms per call (CUDA events between back-to-back calls) and median host ms, after at
    least 5 calls and 100 ms of warm-up (an idle GPU's clocks take a while to rise)."""
    calls, warm_until = 0, time.perf_counter() + 0.1
    while calls < 5 or time.perf_counter() < warm_until:
        fn()
        calls += 1
        if device != "cpu" and calls % 5 == 0:
            torch.cuda.synchronize()  # the warm-up's time is the device's, not the queue's
    if device != "cpu":
        torch.cuda.synchronize()
    host = []
    if device == "cpu":
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            host.append(1e3 * (time.perf_counter() - start))
        return statistics.median(host), statistics.median(host)
    events = [torch.cuda.Event(enable_timing=True) for _ in range(iters + 1)]
    for i in range(iters):
        events[i].record()
        start = time.perf_counter()
        fn()
        host.append(1e3 * (time.perf_counter() - start))
    events[iters].record()
    torch.cuda.synchronize()
    device_ms = [events[i].elapsed_time(events[i + 1]) for i in range(iters)]
    return statistics.median(device_ms), statistics.median(host)


def timed_in_turns(fns, iters, per_turn=3):
    """CPU: median ms of each of fns, called in turns (5 warm-up turns, then turns of one untimed call and
    per_turn timed ones until each has iters): a shared machine's bandwidth drifts over a run, and turns
    expose every implementation to it alike. The untimed call takes the switch: PyTorch's OpenMP threads
    spin for a while after its ops, on the cores the next implementation's threads want."""
    for _ in range(5):
        for fn in fns:
            fn()
    ms = [[] for _ in fns]
    while len(ms[0]) < iters:
        for k, fn in enumerate(fns):
            fn()
            for _ in range(per_turn):
                start = time.perf_counter()
                fn()
                ms[k].append(1e3 * (time.perf_counter() - start))
    return [statistics.median(m) for m in ms]


class Timer:
    """Times the implementations of one list and param dtype: on a GPU each as it comes (then frees it),
    on the CPU all together in turns once every one is set up and checked."""

    def __init__(self, iters, device, record):
        self.iters, self.device, self.record, self.pending = iters, device, record, []

    def add(self, impl, fn, shadow_dtype, cleanup=None):
        if self.device == "cuda":
            self.record(impl, *timed(fn, self.iters, self.device), shadow_dtype)
            if cleanup:
                cleanup()
        else:
            self.pending.append((impl, fn, shadow_dtype, cleanup))

    def finish(self):
        medians = timed_in_turns([p[1] for p in self.pending], self.iters) if self.pending else []
        for (impl, _, shadow_dtype, cleanup), ms in zip(self.pending, medians):
            self.record(impl, ms, ms, shadow_dtype)
            if cleanup:
                cleanup()
        self.pending = []


def copy_gbps(iters, device):
    src = torch.rand(1 << (29 if device == "cuda" else 26), device=device)  # 2 GiB, 256 MiB on the CPU
    dst = torch.empty_like(src)
    ms, _ = timed(lambda: dst.copy_(src), iters, device)
    return 2 * src.numel() * 4 / ms / 1e6


def cpu_name():
    """The CPU's model name, as the C benchmark names its results."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def sample(sizes):
    """Tensors checked against float64: all of a small list, a spread of a large one."""
    if sum(sizes) < 2e8:
        return list(range(len(sizes)))
    return sorted({0, 1, len(sizes) // 2, len(sizes) - 2, len(sizes) - 1})


def tolerance(shadow_dtype):
    """Relative error allowed against float64: f32 rounding, or a whole bf16 ulp (2^-7) for a bf16 shadow,
    which stochastic rounding may land on either side."""
    return 1e-6 if shadow_dtype == torch.float32 else 2.0 ** -7


class Check:
    """Keeps the checked tensors' shadow start; after the params move and one
    update, each shadow must be start + weight * (param - start) in float64, up to
    the shadow dtype's rounding."""

    def __init__(self, indices, shadows):
        self.indices = indices
        self.start = {i: shadows[i].detach().double().clone() for i in indices}

    def verify(self, impl, shadows, params, weight, shadow_dtype=torch.float32):
        worst = 0.0
        for i in self.indices:
            ref = self.start[i] + weight * (params[i].double() - self.start[i])
            got = shadows[i].detach().double()
            if ref.numel():
                worst = max(worst, ((got - ref).abs() / (ref.abs() + 1e-30)).max().item())
        if worst > tolerance(shadow_dtype):
            raise AssertionError(f"{impl}: relative error {worst:.2e} against float64")


def move(params):
    """What an optimizer step does to the params, in place."""
    for p in params:
        p.add_(0.0625)


def holding(params):
    """A module whose params are the list's tensors, in order."""
    module = torch.nn.Module()
    module.weights = torch.nn.ParameterList([torch.nn.Parameter(p, requires_grad=False) for p in params])
    return module


def run_list(name, iters, device, threads, copy, emit):
    """Every implementation on one list, f32 then bf16 params; threads: the CPU's count (None on a GPU)."""
    sizes = tensor_sizes(name)
    checked = sample(sizes)
    weight = 1.0 - BETA
    for param_dtype in (torch.float32, torch.bfloat16):
        gen = torch.Generator(device=device).manual_seed(1)
        params = [(1.0 + 0.1 * torch.randn(n, device=device, generator=gen)).to(param_dtype) for n in sizes]

        def record(impl, device_ms, host_ms, shadow_dtype=torch.float32):
            required = sum(sizes) * (params[0].element_size() + 2 * shadow_dtype.itemsize)
            gbps = required / device_ms / 1e6
            emit({"list": name, "param_dtype": "f32" if param_dtype == torch.float32 else "bf16",
                  "shadow_dtype": "f32" if shadow_dtype == torch.float32 else "bf16", "num_shadows": 1,
                  "impl": impl, "ms_median": device_ms, "gbps": gbps, "frac_of_copy": gbps / copy,
                  "host_ms_median": host_ms, **({"threads": threads} if threads is not None else {})})

        timer = Timer(iters, device, record)
        module = holding(params)
        polyak_impls = [("polyak", True, torch.float32), ("polyak_unchecked", False, torch.float32)]
        if param_dtype == torch.bfloat16:
            polyak_impls.append(("polyak_bf16_shadows", True, torch.bfloat16))
        for impl, check_stale, shadow_dtype in polyak_impls:
            ema = EMA(module, decay=BETA, check_stale=check_stale, shadow_dtype=shadow_dtype,
                      cpu_threads=1 if threads is None else threads)
            run_polyak(impl, ema, params, checked, sizes, timer)

        # the PyTorch ways, checked the same way
        torch_impls = {"torch_loop": lambda s: [x.mul_(BETA).add_(p, alpha=weight) for x, p in zip(s, params)]}
        if param_dtype == torch.float32:
            torch_impls["torch_foreach_lerp"] = lambda s: torch._foreach_lerp_(s, params, weight)
        else:
            torch_impls["torch_cast_then_lerp"] = lambda s: torch._foreach_lerp_(s, [p.float() for p in params], weight)
        for impl, update in torch_impls.items():
            shadows = [p.to(torch.float32, copy=True) for p in params]  # never the params themselves
            check = Check(checked, shadows)
            move(params)
            update(shadows)
            check.verify(impl, shadows, params, weight)
            timer.add(impl, lambda update=update, shadows=shadows: update(shadows), torch.float32)
            shadows = None  # on a GPU, freed before the next implementation
        run_timm("timm_v3", module, params, checked, weight, timer, torch.float32)
        if param_dtype == torch.bfloat16:
            run_timm("timm_v3_bf16_sr", module, params, checked, weight, timer, torch.bfloat16)
        timer.finish()
        params = module = timer = None
        if device == "cuda":
            torch.cuda.empty_cache()


def run_polyak(impl, ema, params, checked, sizes, timer):
    """An EMA over the list's module (its shadows start as the params), checked after one update, then
    timed; closed once timed."""
    check = Check(checked, params)
    move(params)
    ema.update(1)
    got = {}
    for i in checked:
        got[i] = torch.empty(sizes[i], device=params[0].device, dtype=torch.float32)
        ema.handle.get_shadow(0, i, got[i].data_ptr(), "f32", ema._stream(), dst_num_bytes=4 * sizes[i])
    check.verify(impl, got, params, 1.0 - BETA, ema.shadow_dtype)
    got = None
    step = [1]

    def polyak_step():
        step[0] += 1
        ema.update(step[0])

    timer.add(impl, polyak_step, ema.shadow_dtype, ema.close)


def run_timm(impl, module, params, checked, weight, timer, ema_dtype):
    """timm's ModelEmaV3 over the list's module, its EMA in ema_dtype: the params' own (f32: one
    _foreach_lerp_; bf16: its stochastic rounding) or f32 for bf16 params (its mixed-dtype path)."""
    try:
        from timm.utils import ModelEmaV3
    except ImportError:
        print(f"timm not importable, {impl} left out")
        return
    mixed = ema_dtype != params[0].dtype
    # timm before 1.0.31 has neither the mixed-dtype path nor bf16 stochastic rounding: its bf16 EMA would be
    # a plain lerp, timed under a name that says otherwise
    accepts = inspect.signature(ModelEmaV3.__init__).parameters
    needs = "dtype" if mixed else "stochastic_rounding" if ema_dtype == torch.bfloat16 else None
    if needs and needs not in accepts:
        print(f"timm {timm_version()}'s ModelEmaV3 has no {needs}= argument: {impl} left out")
        return
    mixed_dtype = {"dtype": ema_dtype} if mixed else {}
    ema = ModelEmaV3(module, decay=BETA, **mixed_dtype)  # update() without a step: the decay
    shadows = list(ema.module.weights)
    check = Check(checked, shadows)
    move(params)
    ema.update(module)
    check.verify(impl, shadows, params, weight, ema_dtype)
    timer.add(impl, lambda: ema.update(module), ema_dtype)


def timm_version():
    try:
        from importlib.metadata import version
        return version("timm")
    except Exception:
        return "(version unknown)"


def print_targets(rows):
    """polyak's speed over the baselines it aims to beat, from one list's rows at one thread count."""
    ms = {(r["impl"], r["param_dtype"], r["shadow_dtype"]): r["ms_median"] for r in rows}
    pairs = [("f32 params, f32 shadows: over torch._foreach_lerp_", ("torch_foreach_lerp", "f32", "f32"),
              ("polyak", "f32", "f32"), 1.0),
             ("bf16 params, f32 shadows: over timm ModelEmaV3 (two passes)", ("timm_v3", "bf16", "f32"),
              ("polyak", "bf16", "f32"), 1.5),
             ("bf16 params, bf16 shadows: over timm's stochastic rounding", ("timm_v3_bf16_sr", "bf16", "bf16"),
              ("polyak_bf16_shadows", "bf16", "bf16"), 1.2)]
    threads = f", {rows[0]['threads']} threads" if "threads" in rows[0] else ""
    for what, baseline, ours, target in pairs:
        if baseline in ms and ours in ms:
            print(f"targets {rows[0]['list']}{threads}: "
                  f"{what} {ms[baseline] / ms[ours]:.2f}x (target {target})")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lib", help="path to libpolyak.so (default: the package's)")
    parser.add_argument("--out", help="JSON lines file to append to")
    parser.add_argument("--lists", default="gpt2-124m,gpt2-xl,llama2-7b,vit-b16,resnet50,tiny-10k")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--threads", default="1,2",
                        help="CPU: thread counts, each for torch (set_num_threads; 0 leaves torch's) and "
                             "polyak (cpu_threads; 0: one per core) alike")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("vs_torch: no CUDA device (use --device cpu to check the glue)")
    if args.lib:
        os.environ["POLYAK_LIBRARY"] = args.lib
    if os.environ.get("POLYAK_LIBRARY") or importlib.util.find_spec("polyak") is None:
        sys.path.insert(0, os.path.join(HERE, "..", "python"))  # the package's sources of this checkout
    import polyak
    global EMA
    from polyak.torch import EMA
    print(f"polyak {polyak.version()} from {polyak.library_path()}")
    card = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    commit = os.environ.get("POLYAK_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip() or "unknown"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    out = open(args.out, "a") if args.out else None
    rows = []

    def emit(row):
        row = {"card": card, "date": date, "commit": commit, "torch_threads": torch.get_num_threads(), **row}
        rows.append(row)
        print(f"{row['list']:10} {row['param_dtype']:5} {row['shadow_dtype']:5} {row['impl']:22} "
              f"{row['ms_median']:10.4f} {row['gbps']:8.1f} {row['frac_of_copy']:8.3f} {row['host_ms_median']:8.3f}",
              flush=True)
        if out:
            out.write(json.dumps(row) + "\n")
            out.flush()

    for threads in [int(t) for t in args.threads.split(",")] if args.device == "cpu" else [None]:
        if threads:
            torch.set_num_threads(threads)
        copy = copy_gbps(args.iters, args.device)
        print(f"\nPyTorch {torch.__version__} on {card}"
              f"{'' if threads is None else f', {threads} threads (torch: {torch.get_num_threads()})'}: "
              f"copy bandwidth {copy:.0f} GB/s")
        print(f"{'list':10} {'param':5} {'shadw':5} {'impl':22} {'ms median':>10} {'GB/s':>8} {'of copy':>8} "
              f"{'host ms':>8}")
        for name in args.lists.split(","):
            rows.clear()
            try:
                run_list(name, args.iters, args.device, threads, copy, emit)
            except torch.cuda.OutOfMemoryError:
                print(f"{name}: out of device memory, left out")
                torch.cuda.empty_cache()
            print_targets(rows)


if __name__ == "__main__":
    main()
