"""Plots benchmark results: the fraction of the card's copy bandwidth each
implementation reaches, per tensor list, one panel per (param, shadow, K).

Usage: plot.py RESULTS.jsonl [OUT.png]   (default: the .jsonl name with .png)
Needs matplotlib.
"""
import collections
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ORDER = ["polyak", "polyak_separate_passes", "cublas_per_tensor", "torch_foreach_lerp",
         "torch_cast_then_lerp", "timm_v3", "torch_loop", "polyak_cpu"]


def main():
    path = sys.argv[1]
    out = sys.argv[2] if len(sys.argv) > 2 else path.rsplit(".", 1)[0] + ".png"
    rows = [json.loads(line) for line in open(path) if line.strip()]
    rows = [r for r in rows if r["impl"] in ORDER]
    panels = collections.OrderedDict()
    for r in rows:
        panels.setdefault((r["param_dtype"], r["shadow_dtype"], r["num_shadows"]), []).append(r)
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.2 * len(panels)), squeeze=False)
    for ax, ((param, shadow, k), items) in zip(axes[:, 0], panels.items()):
        lists = list(dict.fromkeys(r["list"] for r in items))
        impls = [i for i in ORDER if any(r["impl"] == i for r in items)]
        width = 0.8 / len(impls)
        for n, impl in enumerate(impls):
            values = {r["list"]: r["frac_of_copy"] for r in items if r["impl"] == impl}
            xs = [i + n * width for i, name in enumerate(lists) if name in values]
            ax.bar(xs, [values[name] for name in lists if name in values], width, label=impl)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(lists))])
        ax.set_xticklabels(lists)
        ax.set_ylabel("of copy bandwidth")
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
