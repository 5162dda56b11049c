"""fedloom's executors against a minimal hand-written single-process PyTorch FedAvg loop.

Workloads:
  W1  1000 Dirichlet(0.3) MNIST clients, 100 per round, 2NN, E=1, B=20, 10 rounds
      (targets on a 2-core CPU: parallel <= 0.75x the bare loop per round)
  W2  10 IID MNIST clients, all per round, CNN, E=1, B=32, 3 rounds (target <= 0.90x)

Timing: in one process, runs alternate (bare, fedloom, bare, fedloom, ...) so drift in
machine speed hits both alike; fedloom's seconds per round are measured between round
callbacks of ``run_simulation`` (sampling, training, aggregation, checkpoint commit
included). The first round (which also forks the pool) and the last (which evaluates)
are excluded from the medians; start-up is the time from ``run_simulation`` being
called to the end of round 1 minus a median round. That includes first-use warm-up
(allocator growth, oneDNN kernel set-up in each fresh worker), so the bare loop's own
first-round excess over its median round is printed next to it.

Memory (``--memory``): each variant runs alone in a subprocess while this process
samples the PSS of its process tree (main + workers); peak PSS is compared with the
bare loop's (target <= 1.2x).

    PYTHONPATH=src python benchmarks/bench_executors.py --workload w1 [--executors parallel,vectorized]
    PYTHONPATH=src python benchmarks/bench_executors.py --workload w2 --rounds 3 --repeats 2
    PYTHONPATH=src python benchmarks/bench_executors.py --workload w1 --memory
    PYTHONPATH=src python benchmarks/bench_executors.py --workload w1 --executors vectorized,sequential --device cuda
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedloom.config import load_config
from fedloom.config.schema import ExperimentConfig
from fedloom.models import MLP2NN
from fedloom.models.zoo import CNN
from fedloom.sim.build import Components, build_components
from fedloom.sim.executor import Executor, torch_threads
from fedloom.sim.parallel import ParallelExecutor
from fedloom.sim.runner import run_simulation
from fedloom.sim.sampling import cohort_size, sample_clients
from fedloom.sim.vectorized import VectorizedExecutor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baseline import RoundTimer, bare_loop
from bench_memory import peak_pss_of_command


def workload(args: argparse.Namespace) -> tuple[ExperimentConfig, Callable[[], torch.nn.Module]]:
    common = [
        f"rounds={args.rounds}", "client.epochs=1", "client.lr=0.05", f"eval.every={args.rounds + 1}",
        "eval.target_accuracy=0", f"data.dir={args.data_dir}", f"workers={args.workers}",
        f"device={args.device}",  # the sequential and parallel executors train on the workspace's device
    ]  # fmt: skip
    if args.workload == "w1":
        sets = ["data.num_clients=1000", "data.alpha=0.3", "sampling.fraction=0.1", "client.batch_size=20"]
        return load_config(None, common + sets), MLP2NN
    sets = [
        "data.num_clients=10", "data.partition=iid", "sampling.fraction=1.0", "client.batch_size=32",
        "model.name=cnn", f"data.train_subset={args.train_subset}", "eval.batch_size=500",
    ]  # fmt: skip
    return load_config(None, common + sets), CNN


class _EveryUpdate:
    """An executor seen through ``run_round`` only, so the runner cannot reduce on its workers."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def run_round(self, *args: Any) -> Any:
        return self.inner.run_round(*args)

    def close(self) -> None:
        self.inner.close()


def make(kind: str, comps: Components, args: argparse.Namespace) -> Executor:
    if kind == "parallel":
        return ParallelExecutor(comps.workspace, comps.train, comps.pipeline, workers=args.workers)
    if kind == "vectorized":
        return VectorizedExecutor(
            comps.workspace, comps.train, comps.pipeline, device=args.device, block=args.block
        )
    if kind in ("ray", "ray-updates"):
        from fedloom.sim.ray_executor import RayExecutor

        ray_ex = RayExecutor(comps.workspace, comps.train, comps.pipeline, workers=args.workers)
        # "ray-updates": the same actors returning every update (no reduction on the workers).
        return ray_ex if kind == "ray" else _EveryUpdate(ray_ex)
    from fedloom.sim.executor import SequentialExecutor

    return SequentialExecutor(comps.workspace, comps.train, comps.pipeline)


def run_fedloom(
    cfg: ExperimentConfig, comps: Components, kind: str, args: argparse.Namespace
) -> tuple[list[float], float]:
    """Seconds per round (rounds 2..R-1) and start-up seconds for one run on executor ``kind``."""
    with tempfile.TemporaryDirectory() as tmp:
        timer = RoundTimer()
        t0 = time.perf_counter()
        ex = make(kind, comps, args)
        try:
            run_simulation(cfg, Path(tmp) / "run", listener=timer, components=comps, executor=ex)
        finally:
            close = getattr(ex, "close", None)
            if close is not None:
                close()
    per_round = [b - a for a, b in zip(timer.stamps, timer.stamps[1:], strict=False)]
    middle = per_round[1:-1] or per_round
    startup = (timer.stamps[1] - t0) - statistics.median(middle)
    return middle, startup


def forked_floor(
    train: object, cohorts: list[list[int]], make_model: Callable[[], torch.nn.Module], args: argparse.Namespace,
    lr: float, batch: int, seed: int,
) -> float:  # fmt: skip
    """The hardware floor: the bare loop itself split over ``workers`` forked processes x 1 thread.

    Each process trains every ``workers``-th client of each cohort with no
    aggregation or transport at all; the round time is the slowest process's
    median. No executor can beat this on the same cores.
    """
    read, write = os.pipe()
    pids = []
    for k in range(args.workers):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            torch.set_num_threads(1)
            times = bare_loop(train, [c[k :: args.workers] for c in cohorts], make_model, lr, batch, seed)
            os.write(write, f"{statistics.median(times[1:-1] or times)}\n".encode())
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    os.close(write)
    with os.fdopen(read) as f:
        return max(float(x) for x in f.read().split())


def child(args: argparse.Namespace) -> None:
    """One variant, alone in this process (for --memory)."""
    cfg, make_model = workload(args)
    comps = build_components(cfg)
    if args.child == "bare":
        size = cohort_size(comps.train.num_clients, cfg.sampling.fraction, cfg.sampling.min_clients)
        cohorts = [
            sample_clients(cfg.seed, r, comps.train.num_clients, size).tolist()
            for r in range(1, args.rounds + 1)
        ]
        bare_loop(comps.train, cohorts, make_model, cfg.client.lr, cfg.client.batch_size, 0, args.device)
    else:
        run_fedloom(cfg, comps, args.child, args)
    print("done")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=["w1", "w2"], default="w1")
    ap.add_argument(
        "--executors",
        default="parallel",
        help="comma-separated: parallel,vectorized,sequential,ray,ray-updates (Ray without worker-side reduction)",
    )
    ap.add_argument("--rounds", type=int, default=0, help="default: 10 for w1, 3 for w2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--block", type=int, default=0, help="vectorized block size (0 = memory budget)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--bare-threads", type=int, default=0, help="torch threads of the bare loop (0 = default)"
    )
    ap.add_argument("--train-subset", type=int, default=0, help="w2 only: first N MNIST examples (0 = all)")
    ap.add_argument("--data-dir", default="")
    ap.add_argument("--memory", action="store_true", help="measure peak PSS per variant in subprocesses")
    ap.add_argument(
        "--floor", action="store_true", help="also time the bare loop split over forked processes (the floor)"
    )
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.rounds = args.rounds or (10 if args.workload == "w1" else 3)
    if args.child:
        child(args)
        return
    kinds = [k for k in args.executors.split(",") if k]
    if args.memory:
        base = [sys.executable, __file__, *[a for a in sys.argv[1:] if a != "--memory"]]
        peaks = {v: peak_pss_of_command([*base, "--child", v])[0] for v in ["bare", *kinds]}
        for v, mb in peaks.items():
            print(
                f"{args.workload} peak PSS {v:>10}: {mb:7.1f} MB  ratio {mb / peaks['bare']:.2f} (target <= 1.20)"
            )
        return
    cfg, make_model = workload(args)
    comps = build_components(cfg)
    size = cohort_size(comps.train.num_clients, cfg.sampling.fraction, cfg.sampling.min_clients)
    cohorts = [
        sample_clients(cfg.seed, r, comps.train.num_clients, size).tolist() for r in range(1, args.rounds + 1)
    ]
    print(
        f"{args.workload}: torch threads {torch.get_num_threads()}; workers {args.workers}; data {comps.data_source}"
    )
    bare_times: list[float] = []
    fed: dict[str, list[float]] = {k: [] for k in kinds}
    starts: dict[str, list[float]] = {k: [] for k in kinds}
    floors: list[float] = []
    bare_warmup: list[float] = []  # the bare loop's own first round over its median round
    for rep in range(args.repeats):
        with torch_threads(args.bare_threads):
            bare = bare_loop(
                comps.train, cohorts, make_model, cfg.client.lr, cfg.client.batch_size, rep, args.device
            )
        bare_times += bare[1:-1] or bare
        bare_warmup.append(bare[0] - statistics.median(bare[1:-1] or bare))
        line = [f"repeat {rep + 1}: bare {statistics.median(bare[1:-1] or bare):.4f} s/round"]
        if args.floor:
            floor = forked_floor(
                comps.train, cohorts, make_model, args, cfg.client.lr, cfg.client.batch_size, rep
            )
            floors.append(floor)
            line.append(f"floor {floor:.4f}")
        for k in kinds:
            t, s = run_fedloom(cfg, comps, k, args)
            fed[k] += t
            starts[k].append(s)
            line.append(f"{k} {statistics.median(t):.4f}")
        print(", ".join(line), flush=True)
    b = statistics.median(bare_times)
    target = 0.75 if args.workload == "w1" else 0.90
    if floors:
        f = statistics.median(floors)
        print(
            f"{args.workload} median s/round: bare loop over {args.workers} forked processes x 1 thread "
            f"(the floor) {f:.4f}: ratio {f / b:.3f}"
        )
    for k in kinds:
        f = statistics.median(fed[k])
        print(
            f"{args.workload} median s/round: {k} {f:.4f} vs bare loop {b:.4f}: ratio {f / b:.3f} "
            f"(target <= {target}); start-up {statistics.median(starts[k]):.3f} s (target < 1)"
        )
    print(
        f"{args.workload} the bare loop's own first round is {statistics.median(bare_warmup):.3f} s over its "
        "median round (first-use warm-up that any loop pays; start-up above includes the same kind of cost)"
    )


if __name__ == "__main__":
    main()
