"""McMahan et al. 2017 (arXiv 1602.05629) on MNIST: communication rounds to a target test accuracy.

100 clients, C = 0.1 (10 per round), FedAvg with local SGD. Settings:

- ``cnn-iid``:    CNN, E=5, B=10, IID split, target 99%   (the paper reports about 20 rounds)
- ``cnn-shards``: CNN, E=5, B=10, pathological 2-shard split, target 99%
- ``2nn-iid``:    2NN, E=1, B=10, IID split, target 97%
- ``2nn-shards``: 2NN, E=1, B=10, pathological 2-shard split, target 97%

Each run stops at its target (or the round budget) and the script prints a table of
rounds to target next to the paper's figure where the issue quotes it. Results, run
directories and plots land under ``--out``. Not part of CI (the CNN runs take minutes).

    python benchmarks/repro_mcmahan.py --only 2nn-iid cnn-iid [--rounds 300] [--lr 0.05]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fedloom.config import load_config
from fedloom.results.report import write_report
from fedloom.sim.runner import run_simulation

SETTINGS: dict[str, tuple[tuple[str, ...], float, str]] = {
    "cnn-iid": (("model.name=cnn", "client.epochs=5", "data.partition=iid"), 0.99, "about 20"),
    "cnn-shards": (("model.name=cnn", "client.epochs=5", "data.partition=shards"), 0.99, "-"),
    "2nn-iid": (("model.name=2nn", "client.epochs=1", "data.partition=iid"), 0.97, "-"),
    "2nn-shards": (("model.name=2nn", "client.epochs=1", "data.partition=shards"), 0.97, "-"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--executor", default="sequential")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/mcmahan"))
    args = ap.parse_args()
    rows = []
    for name in args.only:
        sets, target, paper = SETTINGS[name]
        cfg = load_config(
            None,
            (
                *sets,
                "data.num_clients=100",
                "sampling.fraction=0.1",
                "client.batch_size=10",
                f"client.lr={args.lr}",
                f"eval.target_accuracy={target}",
                f"rounds={args.rounds}",
                f"seed={args.seed}",
                f"executor={args.executor}",
            ),
        )
        run_dir = args.out / f"{name}-lr{args.lr}-s{args.seed}"
        t0 = time.perf_counter()
        result = run_simulation(cfg, run_dir, resume=(run_dir / "state.sqlite").exists())
        seconds = time.perf_counter() - t0
        reached = result.stop_reason == "target accuracy reached"
        acc = result.final_metrics.get("test_accuracy", float("nan"))
        rows.append((name, target, result.final_round if reached else None, paper, acc, seconds))
        print(
            f"{name}: {result.stop_reason} at round {result.final_round} (acc {acc:.4f}, {seconds:.0f} s)",
            flush=True,
        )
    write_report([args.out / f"{n}-lr{args.lr}-s{args.seed}" for n in args.only], args.out)
    print("\n| setting | target | rounds to target (fedloom) | paper | final acc | wall s |")
    print("|---|---|---|---|---|---|")
    for name, target, rounds, paper, acc, seconds in rows:
        got = str(rounds) if rounds is not None else f"not reached in {args.rounds}"
        print(f"| {name} | {target:.2f} | {got} | {paper} | {acc:.4f} | {seconds:.0f} |")
    (args.out / "table.json").write_text(json.dumps(rows), encoding="utf-8")


if __name__ == "__main__":
    main()
