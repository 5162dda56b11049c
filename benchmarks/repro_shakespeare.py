"""LEAF's Shakespeare with FedAvg: per-role test accuracy against rounds, next to the published target.

McMahan et al. 2017 (arXiv 1602.05629, §3) train the same two-layer LSTM (embedding 8,
256 units) on Shakespeare split by speaking role with FedAvg, C = 0.1 of the roles a
round, B = 10, E = 1 and a client learning rate of 1.47, and count rounds to 54% test
accuracy; LEAF (Caldas et al. 2018, arXiv 1812.01097) uses the same model and split.
On a 2-core CPU this script runs a reduced setting (every difference is an argument):
fewer clients a round (``--clients``), a fixed number of local steps instead of a full
epoch (``--steps``), fewer rounds (``--rounds``), and evaluation on the first
``--test-per-role`` test windows of every role. It goes through ``fedloom simulate``'s
own code path (:func:`~fedloom.sim.runner.run_simulation`) and prints the overrides, the
example-weighted per-role test accuracy (``site_accuracy``) at each evaluation and the
round that first reached ``--target``. Not part of CI.

    PYTHONPATH=src python benchmarks/repro_shakespeare.py [--rounds 60] [--clients 10] [--steps 50]
        [--lr 1.47] [--test-per-role 10] [--eval-every 5] [--out /tmp/repro/shakespeare]
        [--plot docs/results/shakespeare_fedavg.png]
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

ROLES = 850  # clients after LEAF's filters with fedloom's defaults


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--clients", type=int, default=10, help="clients a round")
    ap.add_argument("--steps", type=int, default=50, help="local SGD steps a round")
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1.47)
    ap.add_argument("--test-per-role", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--target", type=float, default=0.54)
    ap.add_argument("--data-dir", default="")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/repro/shakespeare"))
    ap.add_argument("--plot", type=Path, default=Path("docs/results/shakespeare_fedavg.png"))
    args = ap.parse_args()
    torch.set_num_threads(1)  # a shared machine: one core
    overrides = (
        "data.dataset=shakespeare",
        f"data.dir={args.data_dir!r}",
        f"data.num_clients={ROLES}",
        f"data.test_subset={args.test_per_role}",
        "algorithm.name=fedavg",
        f"client.lr={args.lr}",
        f"client.batch_size={args.batch}",
        f"client.steps={args.steps}",
        f"sampling.fraction={args.clients / ROLES}",
        f"sampling.min_clients={args.clients}",
        f"eval.every={args.eval_every}",
        "eval.target_accuracy=0",
        "executor=sequential",
        f"rounds={args.rounds}",
        f"seed={args.seed}",
    )
    print("fedloom simulate " + " ".join(f"--set {o}" for o in overrides), flush=True)
    cfg = load_config(None, overrides)
    run_dir = args.out / f"fedavg-c{args.clients}-k{args.steps}-lr{args.lr}-s{args.seed}"
    t0 = time.perf_counter()
    run_simulation(cfg, run_dir, resume=(run_dir / "state.sqlite").exists())
    seconds = time.perf_counter() - t0
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    points = [(m["round"], m["site_accuracy"]) for m in history if "site_accuracy" in m]
    hit = next((r for r, a in points if a >= args.target), None)
    print(f"\n{len(history)} rounds in {seconds:.0f} s; rounds to {args.target:.0%}: {hit or 'not reached'}")
    print("| round | per-role test accuracy (example-weighted) | median role | p10 role |")
    print("|---|---|---|---|")
    by_round = {m["round"]: m for m in history}
    for r, acc in points:
        m = by_round[r]
        print(f"| {r} | {acc:.4f} | {m['site_accuracy_median']:.4f} | {m['site_accuracy_p10']:.4f} |")
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    rs, accs = zip(*points, strict=True)
    ax.plot(rs, accs, marker="o", label=f"fedloom FedAvg ({args.clients} roles/round, {args.steps} steps)")
    ax.axhline(args.target, color="grey", linestyle="--", label=f"target {args.target:.0%} (McMahan et al.)")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (per-role, weighted)")
    ax.set_title("Shakespeare (LEAF split, 850 roles), stacked LSTM")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
