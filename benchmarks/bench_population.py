"""Populations of 10^3, 10^5 and 10^6 registered clients, 1000 sampled per round.

Each population is a :class:`~fedloom.data.population.LazyPopulation` (per-client data
generated on demand from the seed); the model is logistic regression on 60 features.
For each size, in a fresh subprocess (so peaks do not mix), this prints the
registration time, the sampling time, seconds per round and the peak PSS of the
process tree (main + workers); memory should depend on the cohort and the model,
not on the population.

    PYTHONPATH=src python benchmarks/bench_population.py [--rounds 5] [--executor parallel]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import peak_pss_of_command


def child(population: int, rounds: int, executor: str, workers: int) -> None:
    from fedloom.algorithms.api import ClientUpdate, ServerContext, Workspace
    from fedloom.algorithms.fedavg import FedAvg
    from fedloom.algorithms.local import LocalSGD
    from fedloom.core.params import Params
    from fedloom.data.population import LazyPopulation
    from fedloom.models.zoo import LogisticRegression
    from fedloom.sim.executor import Executor, SequentialExecutor, close_executor
    from fedloom.sim.parallel import ParallelExecutor
    from fedloom.sim.sampling import sample_clients
    from fedloom.transforms.pipeline import Pipeline

    t0 = time.perf_counter()
    pop = LazyPopulation(population, seed=0)
    register = time.perf_counter() - t0
    module = LogisticRegression(in_features=pop.dim, num_classes=pop.num_classes)
    algo = FedAvg(local=LocalSGD(lr=0.1, batch_size=20, epochs=1))
    state = algo.server_init(Params.from_module(module))
    ex: Executor = (
        ParallelExecutor(Workspace(module), pop, Pipeline(()), workers=workers)
        if executor == "parallel"
        else SequentialExecutor(Workspace(module), pop, Pipeline(()))
    )
    samples, per_round = [], []
    for r in range(1, rounds + 1):
        t = time.perf_counter()
        cohort = sample_clients(0, r, population, min(1000, population)).tolist()
        samples.append(time.perf_counter() - t)
        ctx = ServerContext(0, r, population)
        outs = ex.run_round(algo, algo.broadcast(state), cohort, {}, ctx)
        state = algo.server_update(
            state, algo.aggregate([o for o in outs if isinstance(o, ClientUpdate)], ctx), ctx
        )
        per_round.append(time.perf_counter() - t)
    close_executor(ex)
    print(
        f"{register:.4f} {statistics.median(samples):.4f} {statistics.median(per_round[1:] or per_round):.4f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--executor", choices=["sequential", "parallel"], default="parallel")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--sizes", default="1000,100000,1000000")
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.rounds, args.executor, args.workers)
        return
    print(f"executor {args.executor}, 1000 clients per round, logistic regression (60 -> 10)")
    for size in [int(s) for s in args.sizes.split(",")]:
        cmd = [sys.executable, __file__, "--rounds", str(args.rounds), "--executor", args.executor,
               "--workers", str(args.workers), "--child", str(size)]  # fmt: skip
        peak, out = peak_pss_of_command(cmd)
        register, sample, per_round = (float(v) for v in out.split())
        print(
            f"population {size:>9,}: register {register * 1e3:7.1f} ms, sample {sample * 1e3:6.1f} ms, "
            f"{per_round:.3f} s/round, peak PSS {peak:7.1f} MB"
        )


if __name__ == "__main__":
    main()
