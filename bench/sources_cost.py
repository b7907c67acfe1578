"""Host cost of what EMA.update does for LAWA's gradients (python/polyak/torch/sources.py).

A module of --tensors one-element f32 params (the host overhead dominates; the library's own
work per tensor is a few elements), --iters updates each, medians in microseconds per call:
  constant            EMA.update with a Constant shadow: the C call and the stale check
  layerwise           EMA.update with a Layerwise shadow following .grad, the .grad tensors in
                      place (zero_grad(set_to_none=False)): the table built and found unchanged,
                      plus the library's norms and betas for every tensor
  table               the table alone: reading every .grad's address and comparing (no C call)
  table_fresh_grads   the same after zero_grad(set_to_none=True) and a backward each time
                      (new .grad tensors: a changed table is set, which waits for the device)
On CUDA (--device cuda) each followed gradient is also marked in use by the update's stream
(record_stream), included in layerwise.

Usage: sources_cost.py [--tensors 1000] [--iters 200] [--device cpu|cuda]
(POLYAK_LIBRARY=build/libpolyak.so PYTHONPATH=python for a build tree's library)
"""
import argparse
import statistics
import time

import torch

import polyak
from polyak.torch import EMA


def median_us(fn, iters, before=None):
    times = []
    for _ in range(iters):
        if before:
            before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tensors", type=int, default=1000)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.ones(1, device=args.device))
                                    for _ in range(args.tensors)])
    loss = lambda: sum(p.sum() for p in model)  # noqa: E731
    loss().backward()
    results = {}
    for name, schedule in (("constant", polyak.Constant(0.999)), ("layerwise", polyak.Layerwise(beta0=0.999))):
        ema = EMA(model, schedules=[schedule])
        step = [0]

        def update(ema=ema, step=step):
            step[0] += 1
            ema.update(step[0])
        update()
        results[name] = median_us(update, args.iters)
        if name == "layerwise":
            results["table"] = median_us(ema._refresh_grads, args.iters)
            results["table_fresh_grads"] = median_us(
                ema._refresh_grads, max(args.iters // 10, 5),
                before=lambda: (model.zero_grad(set_to_none=True), loss().backward()))
        ema.close()
    for name, us in results.items():
        print(f"{args.device} {args.tensors} tensors: {name:18s} {us:9.1f} us per call")


if __name__ == "__main__":
    main()
