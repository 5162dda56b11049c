"""What watching a run costs: the live dashboard (with a page following it) and the TensorBoard
and MLflow trackers attached to simulated W1 rounds, against the same rounds unwatched.

Workload W1 (as in bench_executors.py): 1000 Dirichlet(0.3) MNIST clients, 100 per round, 2NN,
E=1, B=20, evaluated on the last round only. Both variants share one set of components and
one executor, so they differ only in what watches them:

  bare      run_simulation with tracking off and no dashboard
  watched   the trackers of tracking.tensorboard = tracking.mlflow = true (MLflow's local file
            store; built by open_trackers and handed to run_simulation as observers, each call
            timed), the dashboard serving the run directory from a thread of this process, and
            a separate process reading its event stream as an open page would

Runs alternate (bare, watched, watched, bare, ...) so drift in machine speed hits both alike.
Two measures, medians over repeats:

  end to end   paired ratio watched / bare of the median seconds per round between the
               runner's round callbacks (round 1 and the evaluated last round excluded), and
               of the whole run's wall time (tracker and dashboard start-up included)
  direct       the observers' own seconds per round (wall time inside the tracker calls plus
               the dashboard thread's CPU time, from /proc) over the paired bare run's seconds
               per round: the overhead itself, which end-to-end ratios on a shared machine
               cannot resolve to a few percent; and their CPU milliseconds per round, which
               do not grow with waiting for a busy machine's cores (compare them with a
               quiet machine's W1 round in docs/benchmarks.md)

Target: under 5% of a round. One watched run of 2 rounds first imports what the observers need.

    PYTHONPATH=src python benchmarks/bench_observers.py [--rounds 10 --repeats 5 --data-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from fedloom.config import load_config
from fedloom.config.schema import ExperimentConfig
from fedloom.dashboard import start_dashboard
from fedloom.engine import Event
from fedloom.sim.auto import make_executor
from fedloom.sim.build import Components, build_components
from fedloom.sim.executor import Executor, close_executor
from fedloom.sim.runner import run_simulation
from fedloom.trackers.open import Tracker, open_trackers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baseline import RoundTimer

# A page's share of the work: read the event stream to its end, in its own process.
READER = "import sys, urllib.request\nwith urllib.request.urlopen(sys.argv[1]) as r:\n    while r.read1(65536): pass\n"


def w1(rounds: int, data_dir: str, clients: int, watched: bool) -> ExperimentConfig:
    sets = [
        f"rounds={rounds}", "client.epochs=1", "client.lr=0.05", f"eval.every={rounds + 1}",
        "eval.target_accuracy=0", f"data.dir={data_dir}", f"data.num_clients={clients}", "data.alpha=0.3",
        "sampling.fraction=0.1", "client.batch_size=20",
    ]  # fmt: skip
    if watched:
        sets += ["tracking.tensorboard=true", "tracking.mlflow=true"]
    return load_config(None, sets)


class Timed:
    """An observer wrapped to add up the wall and CPU seconds spent in it."""

    def __init__(self, inner: Tracker) -> None:
        self.inner, self.seconds, self.cpu = inner, 0.0, 0.0

    def __call__(self, event: Event) -> None:
        t0, c0 = time.perf_counter(), time.thread_time()
        self.inner(event)
        self.seconds += time.perf_counter() - t0
        self.cpu += time.thread_time() - c0


def thread_cpu_seconds(native_id: int | None) -> float:
    """User + system CPU seconds of one thread of this process (Linux /proc)."""
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Run(NamedTuple):
    per_round: float  # median seconds per inner round
    wall: float  # the whole run, start-up included
    observers: float  # seconds in tracker calls + dashboard thread CPU seconds, over all rounds
    observers_cpu: float  # CPU seconds of the same (immune to waiting for a busy machine's cores)
    page_cpu: float  # CPU seconds of the process reading the event stream
    setup: float  # seconds to open the trackers and start the dashboard


def one_run(
    cfg: ExperimentConfig,
    watched_cfg: ExperimentConfig | None,
    comps: Components,
    execu: Executor,
    run_dir: Path,
) -> Run:
    timer = RoundTimer()
    t0 = time.perf_counter()
    board = reader = None
    timed: list[Timed] = []
    if watched_cfg is not None:
        board = start_dashboard(run_dir)
        reader = subprocess.Popen([sys.executable, "-c", READER, board.url + "events"])
        timed = [Timed(t) for t in open_trackers(watched_cfg, run_dir)]
    setup = time.perf_counter() - t0
    dashboard_cpu = page_cpu = 0.0
    try:
        run_simulation(cfg, run_dir, listener=timer, components=comps, executor=execu, observers=timed)
    finally:
        for t in timed:
            t.inner.close()
        if board is not None:
            dashboard_cpu = thread_cpu_seconds(board._thread.native_id)
            board.close()
        if reader is not None:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            reader.wait(30)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            page_cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    wall = time.perf_counter() - t0
    rounds = [b - a for a, b in zip(timer.stamps, timer.stamps[1:], strict=False)]
    inner = rounds[1:-1] if len(rounds) > 2 else rounds
    return Run(
        statistics.median(inner),
        wall,
        sum(t.seconds for t in timed) + dashboard_cpu,
        sum(t.cpu for t in timed) + dashboard_cpu,
        page_cpu,
        setup,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--data-dir", default="")
    args = ap.parse_args()
    bare_cfg = w1(args.rounds, args.data_dir, args.clients, watched=False)
    watched_cfg = w1(args.rounds, args.data_dir, args.clients, watched=True)
    comps = build_components(bare_cfg)
    execu = make_executor(bare_cfg, comps)
    per_round: list[float] = []
    whole: list[float] = []
    direct: list[float] = []
    setups: list[float] = []
    cpu_ms: list[float] = []
    page_ms: list[float] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            warm = w1(2, args.data_dir, args.clients, watched=False)
            one_run(warm, w1(2, args.data_dir, args.clients, watched=True), comps, execu, Path(tmp) / "warm")
            for i in range(args.repeats):
                order = (False, True) if i % 2 == 0 else (True, False)
                got: dict[bool, Run] = {}
                for watched in order:
                    got[watched] = one_run(
                        bare_cfg,
                        watched_cfg if watched else None,
                        comps,
                        execu,
                        Path(tmp) / f"{i}-{int(watched)}",
                    )
                bare, seen = got[False], got[True]
                per_round.append(seen.per_round / bare.per_round)
                whole.append(seen.wall / bare.wall)
                direct.append(seen.observers / args.rounds / bare.per_round)
                setups.append(seen.setup)
                cpu_ms.append(seen.observers_cpu / args.rounds * 1000)
                page_ms.append(seen.page_cpu / args.rounds * 1000)
                print(
                    f"repeat {i + 1}: s/round bare {bare.per_round:.3f} watched {seen.per_round:.3f} "
                    f"(x{per_round[-1]:.3f}); run bare {bare.wall:.2f} s watched {seen.wall:.2f} s "
                    f"(x{whole[-1]:.3f}); observers {seen.observers / args.rounds * 1000:.1f} ms/round "
                    f"({direct[-1]:.2%} of a bare round; CPU {cpu_ms[-1]:.1f} ms/round), start-up {seen.setup:.2f} s",
                    flush=True,
                )
    finally:
        close_executor(execu)
    med, share = statistics.median(per_round), statistics.median(direct)
    print(
        f"executor: {type(execu).__name__}; W1 with {args.clients} clients, {args.rounds} rounds, {args.repeats} repeats"
    )
    print(
        f"end to end, watched / bare s/round: median of paired ratios x{med:.3f} (range {min(per_round):.3f}-{max(per_round):.3f})"
    )
    print(f"end to end, watched / bare whole run: median of paired ratios x{statistics.median(whole):.3f}")
    print(
        f"direct: observers' own time {share:.2%} of a bare round (range {min(direct):.2%}-{max(direct):.2%}; target < 5%: {'met' if share < 0.05 else 'NOT met'})"
    )
    print(
        f"observers' CPU time: median {statistics.median(cpu_ms):.1f} ms/round (range {min(cpu_ms):.1f}-{max(cpu_ms):.1f})"
    )
    print(
        f"the page reading the stream (its own process): median {statistics.median(page_ms):.1f} ms CPU/round"
    )
    print(f"start-up of trackers and dashboard: median {statistics.median(setups):.2f} s per run")


if __name__ == "__main__":
    main()
