"""Plots benchmark results per tensor list, one panel per (param, shadow, K):
on a GPU the fraction of the card's copy bandwidth each implementation
reaches; on the CPU (rows with "threads") its speed relative to the same
run's in-place loop on one thread, one bar per implementation and thread
count, so that both the comparison and the scaling show.

Usage: plot.py RESULTS.jsonl [OUT.png]   (default: the .jsonl name with .png)
Needs matplotlib.
"""
import collections
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ORDER = ["inplace_loop", "polyak_cpu", "polyak_cpu_round_stochastic", "polyak_cpu_separate_passes", "polyak",
         "polyak_bf16_shadows", "polyak_separate_passes", "cublas_per_tensor", "torch_foreach_lerp",
         "torch_cast_then_lerp", "timm_v3", "timm_v3_bf16_sr", "torch_loop"]


def label(r):
    return f"{r['impl']} x{r['threads']}" if "threads" in r else r["impl"]


def value(r, loop_ms):
    """CPU rows: the one-thread loop's time over the row's; others: of copy."""
    if "threads" in r and r["list"] in loop_ms:
        return loop_ms[r["list"]] / r["ms_median"]
    return r["frac_of_copy"]


def main():
    path = sys.argv[1]
    out = sys.argv[2] if len(sys.argv) > 2 else path.rsplit(".", 1)[0] + ".png"
    rows = [json.loads(line) for line in open(path) if line.strip()]
    rows = [r for r in rows if r["impl"] in ORDER]
    rows.sort(key=lambda r: (ORDER.index(r["impl"]), r.get("threads", 0)))
    loop_ms = {r["list"]: r["ms_median"] for r in rows if r["impl"] == "inplace_loop" and r.get("threads") == 1}
    panels = collections.OrderedDict()
    for r in rows:
        panels.setdefault((r["param_dtype"], r["shadow_dtype"], r["num_shadows"]), []).append(r)
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.2 * len(panels)), squeeze=False)
    for ax, ((param, shadow, k), items) in zip(axes[:, 0], panels.items()):
        lists = list(dict.fromkeys(r["list"] for r in items))
        impls = list(dict.fromkeys(label(r) for r in items))
        width = 0.8 / len(impls)
        for n, impl in enumerate(impls):
            values = {r["list"]: value(r, loop_ms) for r in items if label(r) == impl}
            xs = [i + n * width for i, name in enumerate(lists) if name in values]
            ax.bar(xs, [values[name] for name in lists if name in values], width, label=impl)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(lists))])
        ax.set_xticklabels(lists)
        ax.set_ylabel("of the 1-thread loop's speed" if loop_ms else "of copy bandwidth")
        ax.set_title(f"params {param}, shadows {shadow}, K = {k}")
        ax.axhline(1.0, color="gray", linewidth=0.5)
        ax.legend(fontsize=7, ncol=4)
    first = rows[0]
    fig.suptitle(f"polyak update: {first['card']}, {first['date']}, commit {first['commit']}")
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(out, dpi=110)
    print(f"plot: {out}")


if __name__ == "__main__":
    main()
