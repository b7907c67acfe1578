"""polyak against what PyTorch users run today, on the same tensor lists, card and run.

Implementations (K = 1 shadow, decay 0.999):
  polyak                 polyak.torch.EMA.update on a module holding the list (the package, one C call;
                         it checks first that no param was re-allocated)
  polyak_unchecked       the same with check_stale=False: the C call alone
  torch_foreach_lerp     torch._foreach_lerp_ (timm ModelEmaV3, AveragedModel): f32 params and shadows
  torch_cast_then_lerp   bf16 params cast to f32, then _foreach_lerp_ into f32 shadows
  timm_v3                timm.utils.ModelEmaV3.update on a module holding the list, f32 shadows (if timm
                         imports)
  torch_loop             per tensor shadow.mul_(beta).add_(param, alpha=1-beta)
Before timing, each implementation's result after one update is checked against
float64. Every update is timed between CUDA events (median of --iters); the host
wall time per call is reported too. Results are appended to --out as JSON lines
in the C benchmark's format, with "host_ms_median" added.

Usage: vs_torch.py [--lib build/libpolyak.so] [--out FILE.jsonl] [--lists a,b] [--iters N]
                   [--device cpu]   (cpu: the CPU backend against the same PyTorch ways on the CPU)
--lib picks the library (POLYAK_LIBRARY); without it, the installed package's. From a
checkout, the package is imported from python/ when it is not installed.
"""
import argparse
import datetime
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
    """Median device ms per call (CUDA events between back-to-back calls) and median host ms."""
    for _ in range(5):
        fn()
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


def copy_gbps(iters, device):
    if device == "cpu":
        return float("nan")
    src = torch.rand(1 << 29, device=device)  # 2 GiB
    dst = torch.empty_like(src)
    ms, _ = timed(lambda: dst.copy_(src), iters, device)
    return 2 * src.numel() * 4 / ms / 1e6


def sample(sizes):
    """Tensors checked against float64: all of a small list, a spread of a large one."""
    if sum(sizes) < 2e8:
        return list(range(len(sizes)))
    return sorted({0, 1, len(sizes) // 2, len(sizes) - 2, len(sizes) - 1})


class Check:
    """Keeps the checked tensors' shadow start; after the params move and one
    update, each shadow must be start + weight * (param - start) in float64, up to
    f32 rounding."""

    def __init__(self, indices, shadows):
        self.indices = indices
        self.start = {i: shadows[i].detach().double().clone() for i in indices}

    def verify(self, impl, shadows, params, weight):
        worst = 0.0
        for i in self.indices:
            ref = self.start[i] + weight * (params[i].double() - self.start[i])
            got = shadows[i].detach().double()
            if ref.numel():
                worst = max(worst, ((got - ref).abs() / (ref.abs() + 1e-30)).max().item())
        if worst > 1e-6:
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


def run_list(name, iters, device, copy, emit):
    sizes = tensor_sizes(name)
    checked = sample(sizes)
    weight = 1.0 - BETA
    for param_dtype in (torch.float32, torch.bfloat16):
        gen = torch.Generator(device=device).manual_seed(1)
        params = [(1.0 + 0.1 * torch.randn(n, device=device, generator=gen)).to(param_dtype) for n in sizes]
        required = sum(sizes) * (params[0].element_size() + 2 * 4)

        def record(impl, device_ms, host_ms):
            gbps = required / device_ms / 1e6
            emit({"list": name, "param_dtype": "f32" if param_dtype == torch.float32 else "bf16",
                  "shadow_dtype": "f32", "num_shadows": 1, "impl": impl, "ms_median": device_ms, "gbps": gbps,
                  "frac_of_copy": gbps / copy, "host_ms_median": host_ms})

        # polyak: its shadows start as the params
        module = holding(params)
        for impl, check_stale in (("polyak", True), ("polyak_unchecked", False)):
            ema = EMA(module, decay=BETA, check_stale=check_stale)
            check = Check(checked, params)
            move(params)
            ema.update(1)
            got = {}
            for i in checked:
                got[i] = torch.empty(sizes[i], device=device, dtype=torch.float32)
                ema.handle.get_shadow(0, i, got[i].data_ptr(), "f32", ema._stream(), dst_num_bytes=4 * sizes[i])
            check.verify(impl, got, params, weight)
            got = None
            step = [1]

            def polyak_step():
                step[0] += 1
                ema.update(step[0])

            record(impl, *timed(polyak_step, iters, device))
            ema.close()

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
            record(impl, *timed(lambda: update(shadows), iters, device))
            shadows = None  # free before the next implementation
        run_timm(name, params, checked, weight, iters, device, record)
        params = None
        if device == "cuda":
            torch.cuda.empty_cache()


def run_timm(name, params, checked, weight, iters, device, record):
    try:
        from timm.utils import ModelEmaV3
    except ImportError:
        print(f"{name}: timm not importable, timm_v3 left out")
        return
    model = holding(params)
    # update() without a step uses the decay itself; f32 shadows for bf16 params too (the mixed case)
    ema = ModelEmaV3(model, decay=BETA, dtype=torch.float32)
    shadows = list(ema.module.weights)
    check = Check(checked, shadows)
    move(params)
    ema.update(model)
    check.verify("timm_v3", shadows, params, weight)
    record("timm_v3", *timed(lambda: ema.update(model), iters, device))
    ema = model = None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lib", help="path to libpolyak.so (default: the package's)")
    parser.add_argument("--out", help="JSON lines file to append to")
    parser.add_argument("--lists", default="gpt2-124m,gpt2-xl,llama2-7b,vit-b16,resnet50,tiny-10k")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("vs_torch: no CUDA device (use --device cpu to check the glue)")
    if args.lib:
        os.environ["POLYAK_LIBRARY"] = args.lib
    try:
        import polyak
    except ImportError:  # a checkout: the package's sources next to bench/
        sys.path.insert(0, os.path.join(HERE, "..", "python"))
        import polyak
    global EMA
    from polyak.torch import EMA
    print(f"polyak {polyak.version()} from {polyak.library_path()}")
    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    commit = os.environ.get("POLYAK_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip() or "unknown"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    copy = copy_gbps(args.iters, args.device)
    out = open(args.out, "a") if args.out else None
    print(f"\nPyTorch {torch.__version__} on {card} ({torch.get_num_threads()} CPU threads): "
          f"copy bandwidth {copy:.0f} GB/s")
    print(f"{'list':10} {'param':5} {'impl':22} {'ms median':>10} {'GB/s':>8} {'of copy':>8} {'host ms':>8}")

    def emit(row):
        row = {"card": card, "date": date, "commit": commit, "torch_threads": torch.get_num_threads(), **row}
        print(f"{row['list']:10} {row['param_dtype']:5} {row['impl']:22} {row['ms_median']:10.4f} "
              f"{row['gbps']:8.1f} {row['frac_of_copy']:8.3f} {row['host_ms_median']:8.3f}", flush=True)
        if out:
            out.write(json.dumps(row) + "\n")
            out.flush()

    for name in args.lists.split(","):
        try:
            run_list(name, args.iters, args.device, copy, emit)
        except torch.cuda.OutOfMemoryError:
            print(f"{name}: out of device memory, left out")
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
