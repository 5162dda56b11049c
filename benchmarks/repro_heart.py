"""FLamby's Fed-Heart-Disease benchmark: pooled, local (each centre alone), FedAvg, FedProx, SCAFFOLD.

Ogier du Terrail et al. 2022 (arXiv 2210.04620); the protocol is owkin/FLamby's
``flamby/datasets/fed_heart_disease/common.py`` and ``flamby/benchmarks/fed_benchmark.py``:

* model: logistic regression with one output (``Linear(13, 1)``), binary cross-entropy,
  accuracy at probability 1/2, the same initial weights for every method of a seed;
* pooled and local baselines: Adam, lr 0.001, batch 4, 50 epochs over the pooled training
  set (486 records) or over one centre's training set;
* strategies: every centre every round, 100 local SGD steps of batch 4, 15 rounds
  (``get_nb_max_rounds(100)``), learning rates of FLamby's published results file
  ``flamby/results/results_benchmark_fed_heart_disease.csv``: FedAvg 1e-4, FedProx 1e-3 with
  mu 0.1, SCAFFOLD 1e-4 with server learning rate 1.

Strategies run through :func:`fedloom.sim.runner.run_simulation` with a task built from
fedloom's heart-disease data; the baselines are plain torch loops on the same data and
initial weights. Prints per-centre and pooled-test accuracy (mean and standard deviation
over the seeds). Not part of CI; about a minute of CPU for five seeds.

    PYTHONPATH=src python benchmarks/repro_heart.py [--seeds 0 1 2 3 4] [--out benchmarks/results/heart]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from torch import nn

from fedloom.config import load_config
from fedloom.core.rng import derive_seed
from fedloom.data.datasets import ArrayDataset
from fedloom.data.heart_disease import HOSPITALS
from fedloom.data.heart_flamby import all_hospitals
from fedloom.metrics import accuracy
from fedloom.sim.build import build_components
from fedloom.sim.runner import run_simulation
from fedloom.tasks.task import ClientData, Task, build_module

BATCH, LR_BASELINE, EPOCHS_POOLED, STEPS, ROUNDS = 4, 1e-3, 50, 100, 15
STRATEGIES = {
    "FedAvg": ("algorithm.name=fedavg", "client.lr=0.0001"),
    "FedProx": ("algorithm.name=fedprox", "algorithm.mu=0.1", "client.lr=0.001"),
    "SCAFFOLD": ("algorithm.name=scaffold", "client.lr=0.0001", "server.lr=1.0"),
}


def bce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(out.reshape(-1), y.to(out.dtype))


def flamby_task() -> Task:
    """FLamby's heart-disease baseline as a fedloom task: one logit, BCE, plain local SGD."""
    parts = all_hospitals()
    tests = [parts[h][1] for h in HOSPITALS]
    pooled = ArrayDataset(torch.cat([t.x for t in tests]), torch.cat([t.y for t in tests]), 2)
    return Task(
        model=lambda: nn.Linear(13, 1),
        data=ClientData(
            train=[parts[h][0] for h in HOSPITALS], names=HOSPITALS, test=pooled, client_test=tests
        ),
        loss=bce,
        metrics={"accuracy": accuracy},
        name="flamby_heart",
    )


def evaluate(model: nn.Module, tests: list[ArrayDataset]) -> dict[str, float]:
    with torch.no_grad():
        out = {h: accuracy(model(t.x), t.y) for h, t in zip(HOSPITALS, tests, strict=True)}
        x, y = torch.cat([t.x for t in tests]), torch.cat([t.y for t in tests])
        out["pooled"] = accuracy(model(x), y)
    return out


def train_centrally(task: Task, seed: int, data: ArrayDataset, tests: list[ArrayDataset]) -> dict[str, float]:
    """FLamby's single-centre training: Adam, lr 1e-3, batch 4, 50 epochs, shuffled each epoch."""
    model = build_module(task, seed)
    opt = torch.optim.Adam(model.parameters(), lr=LR_BASELINE)
    gen = torch.Generator().manual_seed(derive_seed(seed, "heart-baseline"))
    for _ in range(EPOCHS_POOLED):
        order = torch.randperm(len(data), generator=gen)
        for i in range(0, len(data), BATCH):
            rows = order[i : i + BATCH]
            opt.zero_grad()
            bce(model(data.x[rows]), data.y[rows]).backward()
            opt.step()
    return evaluate(model, tests)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/heart"))
    args = ap.parse_args()
    task = flamby_task()
    parts = all_hospitals()
    trains = [parts[h][0] for h in HOSPITALS]
    tests = [parts[h][1] for h in HOSPITALS]
    pooled_train = ArrayDataset(torch.cat([t.x for t in trains]), torch.cat([t.y for t in trains]), 2)
    results: dict[str, list[dict[str, float]]] = {}
    for seed in args.seeds:
        results.setdefault("Pooled", []).append(train_centrally(task, seed, pooled_train, tests))
        for h, data in zip(HOSPITALS, trains, strict=True):
            results.setdefault(f"Local {h}", []).append(train_centrally(task, seed, data, tests))
        for name, sets in STRATEGIES.items():
            cfg = load_config(
                None,
                (
                    "data.dataset=heart_disease",
                    "data.num_clients=4",
                    "sampling.fraction=1.0",
                    f"client.batch_size={BATCH}",
                    f"client.steps={STEPS}",
                    f"rounds={ROUNDS}",
                    f"seed={seed}",
                    "executor=sequential",
                    *sets,
                ),
            )
            run_dir = args.out / f"{name}-s{seed}"
            run_simulation(cfg, run_dir, components=build_components(cfg, task=task))
            last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
            row = {h: float(last["sites"][h]["accuracy"]) for h in HOSPITALS}
            row["pooled"] = float(last["test_accuracy"])
            results.setdefault(name, []).append(row)
        print(f"seed {seed} done", flush=True)
    cols = [*HOSPITALS, "pooled"]
    print(f"\nFed-Heart-Disease accuracy, mean ± sd over seeds {args.seeds}")
    print("| method | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for method, rows in results.items():
        cells = []
        for c in cols:
            values = [r[c] for r in rows]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {sd:.3f}")
        print(f"| {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
