"""Memory of a long run, and the PSS helpers the other executor benchmarks use.

PSS (proportional set size) splits pages shared between processes -- the forked
workers share the dataset and the libraries with the main process -- so the sum
over a process tree is its true footprint. It is read from
``/proc/PID/smaps_rollup`` (Linux), no dependency needed.

Run: 1000 short rounds (LazyPopulation of 10^4 clients, 20 per round, logistic
regression, 2 local steps) on the chosen executor, printing the PSS of the main
process plus workers every 100 rounds; memory must stop growing.

    PYTHONPATH=src python benchmarks/bench_memory.py [--rounds 1000] [--executor parallel]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import threading
import time
from pathlib import Path


def pss_kb(pid: int) -> int:
    """PSS of one process in KiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        return 0
    return 0


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_pss_mb(root: int) -> float:
    return sum(pss_kb(p) for p in tree_pids(root)) / 1024


class PeakPss:
    """Samples the PSS of a process tree in a thread; ``peak_mb`` is the largest seen."""

    def __init__(self, root: int, every: float = 0.05) -> None:
        self.root, self.every, self.peak_mb = root, every, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, tree_pss_mb(self.root))
            time.sleep(self.every)

    def __enter__(self) -> PeakPss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def peak_pss_of_command(cmd: list[str]) -> tuple[float, str]:
    """Run ``cmd`` in a subprocess; return the peak PSS (MB) of its process tree and its stdout."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    with PeakPss(proc.pid) as peak:
        out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed with {proc.returncode}")
    return peak.peak_mb, out


def main() -> None:
    import torch

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

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=1000)
    ap.add_argument("--executor", choices=["sequential", "parallel"], default="parallel")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    pop = LazyPopulation(10_000, seed=0, max_size=40)
    module = LogisticRegression(in_features=pop.dim, num_classes=pop.num_classes)
    algo = FedAvg(local=LocalSGD(lr=0.1, batch_size=20, steps=2))
    state = algo.server_init(Params.from_module(module))
    ex: Executor = (
        ParallelExecutor(Workspace(module), pop, Pipeline(()), workers=args.workers)
        if args.executor == "parallel"
        else SequentialExecutor(Workspace(module), pop, Pipeline(()))
    )
    print(f"torch {torch.__version__}; executor {args.executor}; rounds {args.rounds}")
    samples: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    for r in range(1, args.rounds + 1):
        ctx = ServerContext(0, r, pop.num_clients)
        outs = ex.run_round(
            algo, algo.broadcast(state), sample_clients(0, r, pop.num_clients, 20).tolist(), {}, ctx
        )
        state = algo.server_update(
            state, algo.aggregate([o for o in outs if isinstance(o, ClientUpdate)], ctx), ctx
        )
        if r % 100 == 0 or r == 10:
            samples.append((r, tree_pss_mb(os.getpid())))
            print(
                f"round {r:5d}: PSS (main + workers) {samples[-1][1]:.1f} MB; {time.perf_counter() - t0:.1f} s"
            )
    close_executor(ex)
    first = next(m for r, m in samples if r >= 100)
    print(f"PSS growth from round 100 to {samples[-1][0]}: {samples[-1][1] - first:+.1f} MB")


if __name__ == "__main__":
    main()
