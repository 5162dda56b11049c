"""SCAFFOLD vs FedAvg on McMahan's pathological MNIST split: rounds to a target accuracy.

Karimireddy et al. 2020 (arXiv 1910.06378) show that control variates remove client
drift, so SCAFFOLD needs fewer rounds than FedAvg when clients are heterogeneous and
take many local steps. Setting: MNIST sorted into 200 shards of 300, 2 shards per
client (100 clients, mostly two labels each), 10 clients a round, 2NN, local SGD
lr 0.05, batch 10, E local epochs. Runs FedAvg, SCAFFOLD Option II (the paper's
practical choice) and optionally Option I, stopping each at the target test accuracy,
and prints the rounds each needed. Not part of CI; ``--rounds 2`` is a smoke test.

    python benchmarks/repro_scaffold.py [--target 0.95] [--rounds 500] [--epochs 5]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fedloom.config import load_config
from fedloom.sim.runner import run_simulation

VARIANTS = {
    "fedavg": ("algorithm.name=fedavg",),
    "scaffold-II": ("algorithm.name=scaffold", "algorithm.scaffold_option=II"),
    "scaffold-I": ("algorithm.name=scaffold", "algorithm.scaffold_option=I"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--rounds", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--model", default="2nn")
    ap.add_argument("--train-subset", type=int, default=0, help="use only the first N training examples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/scaffold"))
    ap.add_argument("--only", nargs="*", default=["fedavg", "scaffold-II"], choices=list(VARIANTS))
    args = ap.parse_args()
    base = (
        "data.dataset=mnist",
        "data.partition=shards",
        "data.shards_per_client=2",
        "data.num_clients=100",
        f"data.train_subset={args.train_subset}",
        f"model.name={args.model}",
        "client.lr=0.05",
        "client.batch_size=10",
        f"client.epochs={args.epochs}",
        "sampling.fraction=0.1",
        f"eval.target_accuracy={args.target}",
        f"rounds={args.rounds}",
        f"seed={args.seed}",
    )
    rows = []
    for name in args.only:
        cfg = load_config(None, (*base, *VARIANTS[name]))
        run_dir = args.out / f"{name}-{args.model}-e{args.epochs}-t{args.target}-s{args.seed}"
        t0 = time.perf_counter()
        result = run_simulation(cfg, run_dir, resume=(run_dir / "state.sqlite").exists())
        seconds = time.perf_counter() - t0
        history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        hit = next((m["round"] for m in history if m.get("test_accuracy", 0.0) >= args.target), None)
        best = max(m.get("test_accuracy", 0.0) for m in history)
        rows.append((name, hit, best, result.final_round, seconds))
        print(f"{name}: {result.stop_reason} after {result.final_round} rounds ({seconds:.0f} s)", flush=True)
    print()
    print(f"MNIST pathological (2 shards/client), {args.model}, E={args.epochs}, target {args.target:.2%}")
    print(f"{'variant':<12} {'rounds to target':>16} {'best acc':>9} {'rounds run':>10} {'seconds':>8}")
    for name, hit, best, ran, sec in rows:
        shown = str(hit) if hit is not None else f">{ran}"
        print(f"{name:<12} {shown:>16} {best:>9.4f} {ran:>10d} {sec:>8.0f}")


if __name__ == "__main__":
    main()
