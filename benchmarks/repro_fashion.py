"""Fashion-MNIST under Dirichlet label skew: FedAvg, FedProx, SCAFFOLD and FedAdam, a table and a plot.

Setting: Fashion-MNIST (Xiao et al. 2017, arXiv 1708.07747) split over 100 clients by
Dirichlet(alpha) label skew (Hsu et al. 2019, arXiv 1909.06335) for alpha 0.1 and 0.5,
10 clients a round, the 2NN (784-200-200-10), local SGD lr 0.05, batch 20, one epoch;
FedProx mu 0.01; SCAFFOLD option II; FedAdam with server lr 0.01, beta 0.9/0.99,
tau 1e-3 (Reddi et al. 2021, arXiv 2003.00295). Every run goes through
``fedloom simulate``'s own code path (:func:`~fedloom.sim.runner.run_simulation`) with the
``--set`` overrides printed next to each row. Prints the final and best test accuracy of
each run and writes accuracy-against-rounds curves to ``--plot``. Not part of CI; about
ten minutes of one CPU core for the full table.

    PYTHONPATH=src python benchmarks/repro_fashion.py [--rounds 200] [--out /tmp/repro/fashion]
        [--plot docs/results/fashion_mnist_dirichlet.png]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from fedloom.config import load_config
from fedloom.sim.runner import run_simulation

ALGORITHMS = {
    "FedAvg": ("algorithm.name=fedavg",),
    "FedProx": ("algorithm.name=fedprox", "algorithm.mu=0.01"),
    "SCAFFOLD": ("algorithm.name=scaffold", "algorithm.scaffold_option=II"),
    "FedAdam": ("algorithm.name=fedavg", "server.optimizer=adam", "server.lr=0.01"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.5])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/repro/fashion"))
    ap.add_argument("--plot", type=Path, default=Path("docs/results/fashion_mnist_dirichlet.png"))
    args = ap.parse_args()
    torch.set_num_threads(1)  # a shared machine: one core per run
    base = (
        "data.dataset=fashion_mnist",
        "data.partition=dirichlet",
        "data.num_clients=100",
        "model.name=2nn",
        "client.lr=0.05",
        "client.batch_size=20",
        "client.epochs=1",
        "sampling.fraction=0.1",
        "eval.target_accuracy=0",
        "eval.every=5",
        "executor=sequential",
        f"rounds={args.rounds}",
        f"seed={args.seed}",
    )
    curves: dict[tuple[float, str], list[tuple[int, float]]] = {}
    rows = []
    for alpha in args.alphas:
        for name, sets in ALGORITHMS.items():
            overrides = (*base, f"data.alpha={alpha}", *sets)
            cfg = load_config(None, overrides)
            run_dir = args.out / f"a{alpha}-{name}-s{args.seed}"
            t0 = time.perf_counter()
            run_simulation(cfg, run_dir, resume=(run_dir / "state.sqlite").exists())
            seconds = time.perf_counter() - t0
            history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            points = [(m["round"], m["test_accuracy"]) for m in history if "test_accuracy" in m]
            curves[(alpha, name)] = points
            final, best = points[-1][1], max(a for _, a in points)
            rows.append((alpha, name, final, best, seconds, " ".join(sets)))
            print(f"alpha {alpha} {name}: final {final:.4f} best {best:.4f} ({seconds:.0f} s)", flush=True)
    print(f"\nFashion-MNIST, 100 clients, Dirichlet(alpha), 10 per round, 2NN, {args.rounds} rounds")
    print("| alpha | algorithm | final test accuracy | best test accuracy | seconds | settings |")
    print("|---|---|---|---|---|---|")
    for alpha, name, final, best, sec, sets in rows:
        print(f"| {alpha} | {name} | {final:.4f} | {best:.4f} | {sec:.0f} | `{sets}` |")
    fig, axes = plt.subplots(1, len(args.alphas), figsize=(5 * len(args.alphas), 3.8), sharey=True)
    axes = axes if len(args.alphas) > 1 else [axes]
    for ax, alpha in zip(axes, args.alphas, strict=True):
        for name in ALGORITHMS:
            rs, accs = zip(*curves[(alpha, name)], strict=True)
            ax.plot(rs, accs, label=name)
        ax.set_title(f"Fashion-MNIST, Dirichlet({alpha}), 100 clients")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[0].legend()
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
