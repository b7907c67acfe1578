"""The cost model of docs/scale.md: checkpoint shards (polyak_save_shards) against today's
all-gather save (polyak_save of a sharded handle), for Llama-sized models at W = 8 .. 1024.

    python3 bench/scale_model.py            # the tables of docs/scale.md, as Markdown

Everything here is arithmetic on stated inputs (no measurement): parameter counts from the
models' papers, one f32 shadow (4 bytes a parameter; K shadows multiply every byte count by K,
bf16 shadows halve it), and bandwidths given as parameters:

  B_fs     the file system's aggregate write (or read) bandwidth, what all ranks share
  b_rank   what one rank's stream reaches (pinned copies, its share of the node's link)
  b_one    what one client writes alone: today's save goes through rank 0 only

A sharded save moves total bytes S through all ranks at once: its time is
max(S / B_fs, S / W / b_rank); today's moves S through one client, S / b_one, after an
all-gather that needs S bytes of free GPU memory on every rank.
"""
import argparse

MODELS = {  # parameters and tensors (Llama 2 7B and 70B, Llama 3.1 405B)
    "7B": (6.74e9, 291),
    "70B": (68.98e9, 723),
    "405B": (405.85e9, 1138),
}
WORLD_SIZES = (8, 16, 32, 64, 128, 256, 512, 1024)
BLOCK = 4 << 20


def header_bytes(num_tensors, slice_bytes, world_size):
    """One file's header, from the format: ~1.5 KB of settings, ~130 bytes a tensor (its name
    twice, shape, dtype), 16 hex digits a 4 MiB block, ~12 digits a rank boundary."""
    return 1500 + 130 * num_tensors + 16 * -(-slice_bytes // BLOCK) + 12 * (world_size + 1)


def sizes(params, num_tensors, world_size, bytes_per_param=4):
    total = params * bytes_per_param
    per_rank = total / world_size
    header = header_bytes(num_tensors, int(per_rank), world_size)
    return total, per_rank, header


def table_sizes():
    print("| model | W | shadow a rank (GB) | written a save (GB) | the W headers (MB) |")
    print("|---|---:|---:|---:|---:|")
    for name, (params, tensors) in MODELS.items():
        for w in WORLD_SIZES:
            total, per_rank, header = sizes(params, tensors, w)
            print(f"| {name} | {w} | {per_rank / 1e9:.2f} | {(total + w * header) / 1e9:.1f} | "
                  f"{w * header / 1e6:.1f} |")


def table_times(b_rank, b_one, bandwidths):
    heads = " | ".join(f"sharded, B_fs {b:g} GB/s (s)" for b in bandwidths)
    print(f"| model | W | {heads} | all-gather save: GPU memory a rank (GB) | all-gather save: rank 0 writes (s) |")
    print("|---|---:|" + "---:|" * len(bandwidths) + "---:|---:|")
    for name, (params, tensors) in MODELS.items():
        for w in WORLD_SIZES:
            total, per_rank, header = sizes(params, tensors, w)
            written = total + w * header
            times = " | ".join(f"{max(written / (b * 1e9), (per_rank + header) / (b_rank * 1e9)):.3g}"
                               for b in bandwidths)
            # today: every rank gathers each whole shadow into its GPU memory, rank 0 writes it alone
            print(f"| {name} | {w} | {times} | +{total / 1e9:.0f} | {total / (b_one * 1e9):.0f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--b-rank", type=float, default=2.0, help="one rank's stream, GB/s (2)")
    parser.add_argument("--b-one", type=float, default=5.0, help="one client writing alone, GB/s (5)")
    parser.add_argument("--b-fs", default="10,100,1000", help="aggregate file system bandwidths, GB/s")
    args = parser.parse_args()
    print("### Bytes (one f32 shadow)\n")
    table_sizes()
    print(f"\n### Save time (one f32 shadow; b_rank = {args.b_rank:g} GB/s, b_one = {args.b_one:g} GB/s)\n")
    table_times(args.b_rank, args.b_one, [float(b) for b in args.b_fs.split(",")])


if __name__ == "__main__":
    main()
