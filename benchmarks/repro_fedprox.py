"""Reproduce FedProx's systems-heterogeneity result (Li et al. 2020, arXiv 1812.06127, Fig. 1).

Synthetic(1, 1), 30 devices, 10 selected per round, multinomial logistic regression,
local SGD lr 0.01, batch 10, E = 20 local epochs, 90% stragglers that complete a
uniformly random number of local steps in [1, full). Three runs:

* ``fedavg-drop``   FedAvg dropping the stragglers (the paper's FedAvg);
* ``fedprox-mu0``   FedProx with mu = 0: partial work accepted, no proximal term;
* ``fedprox-mu1``   FedProx with mu = 1 (the paper's best mu for Synthetic(1, 1)).

The training loss is the paper's: the global model's mean loss over all devices'
training data (``fed_loss`` with federated evaluation over all 30 devices). Prints a
table and saves the loss curves as a PNG. Not part of CI; ``--rounds 2 --epochs 1``
is a smoke test. Paper: FedAvg-drop is unstable/higher loss, FedProx mu = 1 converges
to the lowest loss.

    python benchmarks/repro_fedprox.py [--rounds 200] [--epochs 20] [--out benchmarks/results/fedprox]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from fedloom.config import load_config
from fedloom.sim.runner import run_simulation

VARIANTS = {
    "fedavg-drop": ("algorithm.name=fedavg", "algorithm.drop_stragglers=true"),
    "fedprox-mu0": ("algorithm.name=fedprox", "algorithm.mu=0.0"),
    "fedprox-mu1": ("algorithm.name=fedprox", "algorithm.mu=1.0"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--stragglers", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/fedprox"))
    ap.add_argument("--only", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    base = (
        'data.dataset="synthetic"',
        "data.synthetic_alpha=1.0",
        "data.synthetic_beta=1.0",
        "data.num_clients=30",
        "model.name=logreg",
        "model.kwargs={in_features = 60}",
        "client.lr=0.01",
        "client.batch_size=10",
        f"client.epochs={args.epochs}",
        "sampling.fraction=0.3333333333333333",
        f"algorithm.straggler_fraction={float(args.stragglers)}",
        "eval.target_accuracy=0.0",
        "eval.federated=true",
        "eval.federated_clients=30",
        f"rounds={args.rounds}",
        f"seed={args.seed}",
    )
    curves: dict[str, list[tuple[int, float]]] = {}
    rows = []
    for name in args.only:
        cfg = load_config(None, (*base, *VARIANTS[name]))
        run_dir = args.out / f"{name}-r{args.rounds}-e{args.epochs}-s{args.seed}"
        t0 = time.perf_counter()
        resume = (run_dir / "state.sqlite").exists()
        run_simulation(cfg, run_dir, resume=resume)
        seconds = time.perf_counter() - t0
        history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        curves[name] = [(m["round"], m["fed_loss"]) for m in history]
        last = history[-1]
        empty = sum(1 for m in history if m.get("num_examples", 1) == 0)
        rows.append(
            (name, last["fed_loss"], min(v for _, v in curves[name]), last["test_accuracy"], empty, seconds)
        )
        print(f"{name}: done in {seconds:.0f} s", flush=True)
    print()
    print(f"Synthetic(1,1), {args.stragglers:.0%} stragglers, E={args.epochs}, {args.rounds} rounds")
    print(
        f"{'variant':<14} {'train loss':>10} {'min loss':>9} {'test acc':>9} {'empty rnds':>10} {'seconds':>8}"
    )
    for name, loss, best, acc, empty, sec in rows:
        print(f"{name:<14} {loss:>10.4f} {best:>9.4f} {acc:>9.4f} {empty:>10d} {sec:>8.0f}")
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in curves.items():
        ax.plot([r for r, _ in pts], [v for _, v in pts], label=name)
    ax.set_xlabel("round")
    ax.set_ylabel("training loss (all devices)")
    ax.set_title(f"Synthetic(1,1), {args.stragglers:.0%} stragglers, E={args.epochs}")
    ax.legend()
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / f"fedprox_loss_r{args.rounds}_e{args.epochs}_s{args.seed}.png"
    fig.savefig(png, dpi=120, bbox_inches="tight")
    print(f"loss curves: {png}")


if __name__ == "__main__":
    main()
