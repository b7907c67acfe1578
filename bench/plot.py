"""Plots benchmark results per tensor list, one panel per (param, shadow, K):
on a GPU the fraction of the card's copy bandwidth each implementation
reaches; on the CPU (rows with "threads") its element rate, one bar per
implementation and thread count, so that both the comparisons and the
scaling show. --tables prints the CPU rows as the README's tables instead.

Usage: plot.py RESULTS.jsonl [OUT.png]   (default: the .jsonl name with .png)
       plot.py --tables RESULTS.jsonl...
Needs matplotlib (not for --tables).
"""
import collections
import json
import sys

ORDER = ["inplace_loop", "polyak_cpu", "polyak_cpu_avx2", "polyak_cpu_portable", "polyak_cpu_round_stochastic",
         "polyak_cpu_round_stochastic_avx2", "polyak_cpu_round_stochastic_portable", "polyak_cpu_separate_passes",
         "polyak", "polyak_unchecked", "polyak_bf16_shadows", "polyak_separate_passes", "cublas_per_tensor",
         "torch_foreach_lerp", "torch_cast_then_lerp", "timm_v3", "timm_v3_bf16_sr", "torch_loop"]


def impl_name(r):
    """The row's impl, with the instruction set its CPU kernels ran where the row says and the name does not."""
    isa = r.get("isa")
    return f"{r['impl']} ({isa})" if isa and not r["impl"].endswith("_" + isa) else r["impl"]


def label(r):
    return f"{impl_name(r)} x{r['threads']}" if "threads" in r else r["impl"]


def elem_rate(r):
    """Billions of elements per second: the row's bandwidth over the bytes an element moves."""
    size = {"f32": 4, "bf16": 2, "f16": 2}
    return r["gbps"] / (size[r["param_dtype"]] + 2 * r["num_shadows"] * size[r["shadow_dtype"]])


def value(r, cpu):
    return elem_rate(r) if cpu else r["frac_of_copy"]


def tables(paths):
    """The README's CPU tables: the benchmark's rows ("of loop": against the in-place loop beside them, at the
    same thread count) and vs_torch's baselines against polyak, from the same files."""
    rows = [json.loads(line) for path in paths for line in open(path) if line.strip()]
    counts = sorted({r["threads"] for r in rows if "threads" in r})
    cells = collections.OrderedDict()
    for r in rows:
        if r["impl"].startswith("polyak_cpu") or r["impl"] == "inplace_loop":
            key = (r["list"], r["param_dtype"], r["shadow_dtype"], r["num_shadows"], impl_name(r))
            cells.setdefault(key, {})[r["threads"]] = r
    if cells:  # the C benchmark's rows (vs_torch's files have none)
        head = " | ".join(f"{t} thr ms | of loop" for t in counts)
        print(f"| list | params | shadows | K | impl | {head} |")
        print("|---|---|---|---|---|" + "---|---|" * len(counts))
        for (name, param, shadow, k, impl), by in cells.items():
            values = " | ".join(f"{by[t]['ms_median']:.1f} | {by[t]['of_loop']:.2f}" if t in by else " | "
                                for t in counts)
            print(f"| {name} | {param} | {shadow} | {k} | {impl} | {values} |")
    pairs = [("torch_foreach_lerp", "polyak", "f32", "f32"), ("timm_v3", "polyak", "bf16", "f32"),
             ("torch_cast_then_lerp", "polyak", "bf16", "f32"),
             ("timm_v3_bf16_sr", "polyak_bf16_shadows", "bf16", "bf16")]
    ms = {(r["list"], r["impl"], r["param_dtype"], r["shadow_dtype"], r.get("threads")): r["ms_median"]
          for r in rows if "host_ms_median" in r}
    if not ms:
        return
    if cells:
        print()
    head = " | ".join(f"{t} thr: polyak ms | theirs ms | speed-up" for t in counts)
    print(f"| list | params | shadows | baseline | {head} |")
    print("|---|---|---|---|" + "---|---|---|" * len(counts))
    for name in dict.fromkeys(r["list"] for r in rows if "host_ms_median" in r):
        for theirs, ours, param, shadow in pairs:
            got = [(ms.get((name, ours, param, shadow, t)), ms.get((name, theirs, param, shadow, t))) for t in counts]
            if all(a and b for a, b in got):
                values = " | ".join(f"{a:.1f} | {b:.1f} | {b / a:.2f}" for a, b in got)
                print(f"| {name} | {param} | {shadow} | {theirs} | {values} |")


def main():
    if sys.argv[1] == "--tables":
        tables(sys.argv[2:])
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = sys.argv[1]
    out = sys.argv[2] if len(sys.argv) > 2 else path.rsplit(".", 1)[0] + ".png"
    rows = [json.loads(line) for line in open(path) if line.strip()]
    rows = [r for r in rows if r["impl"] in ORDER]
    rows.sort(key=lambda r: (ORDER.index(r["impl"]), r.get("threads", 0)))
    cpu = any("threads" in r for r in rows)
    panels = collections.OrderedDict()
    for r in rows:
        panels.setdefault((r["param_dtype"], r["shadow_dtype"], r["num_shadows"]), []).append(r)
    fig, axes = plt.subplots(len(panels), 1, figsize=(14, 3.2 * len(panels)), squeeze=False)
    for ax, ((param, shadow, k), items) in zip(axes[:, 0], panels.items()):
        lists = list(dict.fromkeys(r["list"] for r in items))
        impls = list(dict.fromkeys(label(r) for r in items))
        width = 0.8 / len(impls)
        for n, impl in enumerate(impls):
            values = {r["list"]: value(r, cpu) for r in items if label(r) == impl}
            xs = [i + n * width for i, name in enumerate(lists) if name in values]
            ax.bar(xs, [values[name] for name in lists if name in values], width, label=impl,
                   color=plt.cm.tab20(n % 20))
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(lists))])
        ax.set_xticklabels(lists)
        ax.set_ylabel("billion elements / s" if cpu else "of copy bandwidth")
        ax.set_title(f"params {param}, shadows {shadow}, K = {k}")
        if not cpu:
            ax.axhline(1.0, color="gray", linewidth=0.5)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    first = rows[0]
    fig.suptitle(f"polyak update: {first['card']}, {first['date']}, commit {first['commit']}")
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(out, dpi=110)
    print(f"plot: {out}")


if __name__ == "__main__":
    main()
