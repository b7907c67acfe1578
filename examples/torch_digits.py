"""Averaged weights on a real (small) task: scikit-learn's bundled digits (8x8 images, no download).

A small MLP trains with noisy SGD (large steps, batches of 4). One polyak EMA keeps four
shadows, all updated by one call per step: two EMAs (beta 0.99 and 0.999) and two EDM2 power
EMAs (sigma_rel 0.05 and 0.10) whose snapshots give a post-hoc average for any other sigma_rel
at the end (here 0.07). The script prints the held-out accuracy of the raw weights and of each
average as training goes, and draws it to a PNG.

    .venv/bin/python examples/torch_digits.py [--steps 4000] [--plot torch_digits.png] [--device cpu]
"""
import argparse

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import polyak
from polyak.torch import EMA

SIGMA_RELS = (0.05, 0.10)
SYNTHESIZED = 0.07


def data(device):
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    return [t.to(device) for t in (x_train, y_train, x_test, y_test)]


def accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        result = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--lr", type=float, default=0.5, help="SGD's step size (large: noisy weights)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--every", type=int, default=0, help="evaluate every N steps (default: steps/10)")
    parser.add_argument("--plot", default="torch_digits.png", help="PNG to write ('' for none)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() and
                        polyak.backend_available("cuda") else "cpu")
    args = parser.parse_args()
    every = args.every or max(args.steps // 10, 1)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = data(args.device)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)).to(args.device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    schedules = [polyak.Constant(0.99), polyak.Constant(0.999)] + [polyak.Power(sigma_rel=s) for s in SIGMA_RELS]
    ema = EMA(model, schedules=schedules)
    labels = ["raw", "ema 0.99", "ema 0.999"]
    history = {label: [] for label in labels}
    steps_seen, snapshots, snapshot_steps, snapshot_sigmas = [], [], [], []
    gen = torch.Generator(device="cpu").manual_seed(1)
    print(f"digits: {len(x_train)} training and {len(x_test)} held-out images; {args.steps} SGD steps "
          f"on {args.device}; held-out accuracy:")
    print(f"{'step':>6} " + " ".join(f"{label:>10}" for label in labels))
    for step in range(1, args.steps + 1):
        batch = torch.randint(0, len(x_train), (args.batch,), generator=gen).to(args.device)
        loss = torch.nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(step)  # all four shadows, one C call
        if step % every == 0 or step == args.steps:
            steps_seen.append(step)
            history["raw"].append(accuracy(model, x_test, y_test))
            for k, label in enumerate(labels[1:]):
                with ema.average_parameters(shadow=k):
                    history[label].append(accuracy(model, x_test, y_test))
            print(f"{step:6d} " + " ".join(f"{history[label][-1]:10.4f}" for label in labels), flush=True)
            for k, sigma_rel in enumerate(SIGMA_RELS):  # the power EMAs' snapshots, kept for later
                snapshots.append(ema.snapshot(2 + k))
                snapshot_steps.append(step)
                snapshot_sigmas.append(sigma_rel)
    coefficients = polyak.posthoc_coefficients(snapshot_steps, snapshot_sigmas, args.steps, SYNTHESIZED)
    with ema.posthoc_parameters(torch.stack(snapshots), coefficients):
        posthoc = accuracy(model, x_test, y_test)
    tracked = {}
    for k, sigma_rel in enumerate(SIGMA_RELS):
        with ema.average_parameters(shadow=2 + k):
            tracked[sigma_rel] = accuracy(model, x_test, y_test)
    print(f"EDM2 power EMAs at the end: sigma_rel 0.05 {tracked[0.05]:.4f}, 0.10 {tracked[0.10]:.4f}; "
          f"sigma_rel {SYNTHESIZED} synthesized post hoc from {len(snapshots)} snapshots: {posthoc:.4f}")
    if args.plot:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: no plot")
            return
        fig, ax = plt.subplots(figsize=(7, 4))
        for label in labels:
            ax.plot(steps_seen, history[label], marker="o", label=label)
        ax.axhline(posthoc, color="gray", linestyle="--", label=f"EDM2 post-hoc sigma_rel {SYNTHESIZED}")
        ax.set_xlabel("SGD step")
        ax.set_ylabel("held-out accuracy")
        ax.set_title("digits: raw weights vs polyak averages")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
