"""fedloom's sequential simulation loop against a minimal hand-written PyTorch FedAvg loop.

Workload: 1000 Dirichlet(0.3) MNIST clients, 100 per round, 2NN, E=1, B=20.
Both loops train the same cohorts on the same data; runs alternate in one process
(fedloom, bare, fedloom, bare, ...) so drift in machine speed hits both alike.
fedloom's time per round is measured between successive round callbacks, so it
includes everything the real loop does: sampling, training, aggregation, the
server update and the SQLite checkpoint commit. Evaluation happens only on the
last round, which is excluded.

    python benchmarks/bench_sequential.py [--rounds 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from fedloom.config import load_config
from fedloom.models import MLP2NN
from fedloom.sim.build import build_components
from fedloom.sim.runner import run_simulation
from fedloom.sim.sampling import cohort_size, sample_clients

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baseline import RoundTimer, bare_loop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data-dir", default="")
    args = ap.parse_args()
    sets = [
        f"rounds={args.rounds}", "data.num_clients=1000", "data.alpha=0.3", "sampling.fraction=0.1",
        "client.epochs=1", "client.batch_size=20", "client.lr=0.05", f"eval.every={args.rounds + 1}",
        "eval.target_accuracy=0", f"data.dir={args.data_dir}", "executor=sequential",
    ]  # fmt: skip
    cfg = load_config(None, sets)
    comps = build_components(cfg)
    size = cohort_size(comps.train.num_clients, cfg.sampling.fraction, cfg.sampling.min_clients)
    cohorts = [
        sample_clients(cfg.seed, r, comps.train.num_clients, size).tolist() for r in range(1, args.rounds + 1)
    ]
    print(f"torch threads: {torch.get_num_threads()}; data: {comps.data_source}")
    fed_times: list[float] = []
    bare_times: list[float] = []
    for rep in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            timer = RoundTimer()
            run_simulation(cfg, Path(tmp) / "run", listener=timer, components=comps)
            per_round = [b - a for a, b in zip(timer.stamps, timer.stamps[1:], strict=False)]
            fed_times += per_round[:-1]  # the last round also evaluates
        bare = bare_loop(comps.train, cohorts, MLP2NN, cfg.client.lr, cfg.client.batch_size, rep)
        bare_times += bare[:-1]
        print(
            f"repeat {rep + 1}: fedloom {statistics.median(per_round[:-1]):.4f} s/round, "
            f"bare loop {statistics.median(bare[:-1]):.4f} s/round"
        )
    f, b = statistics.median(fed_times), statistics.median(bare_times)
    print(
        f"median s/round: fedloom sequential {f:.4f}, bare PyTorch loop {b:.4f}; ratio {f / b:.3f} (target <= 1.10)"
    )


if __name__ == "__main__":
    main()
