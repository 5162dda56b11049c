"""What watching a run costs: the live dashboard (with a page following it) and the TensorBoard
and MLflow trackers attached to simulated W1 rounds, against the same rounds unwatched.

Workload W1 (as in bench_executors.py): 1000 Dirichlet(0.3) MNIST clients, 100 per round, 2NN,
E=1, B=20, evaluated on the last round only. Both variants share one set of components and
one executor, so they differ only in what watches them:

  bare      run_simulation with tracking off and no dashboard
  watched   tracking.tensorboard = tracking.mlflow = true (MLflow's local file store), the
            dashboard serving the run directory from a thread of this process, and a separate
            process reading its event stream as an open page would

Runs alternate (bare, watched, watched, bare, ...) so drift in machine speed hits both alike.
Per run: the median seconds per round between the runner's round callbacks (round 1 and the
evaluated last round excluded) and the whole run's wall time (tracker and dashboard start-up
included). Printed: the median over repeats of the paired ratios watched / bare (target < 1.05
per round). One watched run of 2 rounds first imports what the observers need.

    PYTHONPATH=src python benchmarks/bench_observers.py [--rounds 10 --repeats 5 --data-dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedloom.config import load_config
from fedloom.config.schema import ExperimentConfig
from fedloom.dashboard import start_dashboard
from fedloom.sim.auto import make_executor
from fedloom.sim.build import Components, build_components
from fedloom.sim.executor import Executor, close_executor
from fedloom.sim.runner import run_simulation

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


def one_run(
    cfg: ExperimentConfig, comps: Components, execu: Executor, run_dir: Path, watched: bool
) -> tuple[float, float]:
    """(median seconds per inner round, wall seconds of the whole run)."""
    timer = RoundTimer()
    t0 = time.perf_counter()
    board = start_dashboard(run_dir) if watched else None
    reader = (
        subprocess.Popen([sys.executable, "-c", READER, board.url + "events"]) if board is not None else None
    )
    try:
        run_simulation(cfg, run_dir, listener=timer, components=comps, executor=execu)
    finally:
        if board is not None:
            board.close()
        if reader is not None:
            reader.wait(30)
    wall = time.perf_counter() - t0
    rounds = [b - a for a, b in zip(timer.stamps, timer.stamps[1:], strict=False)]
    inner = rounds[1:-1] if len(rounds) > 2 else rounds
    return statistics.median(inner), wall


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
    try:
        with tempfile.TemporaryDirectory() as tmp:
            warm = w1(2, args.data_dir, args.clients, watched=True)
            one_run(warm, comps, execu, Path(tmp) / "warm", watched=True)
            for i in range(args.repeats):
                order = (False, True) if i % 2 == 0 else (True, False)
                got: dict[bool, tuple[float, float]] = {}
                for watched in order:
                    cfg = watched_cfg if watched else bare_cfg
                    got[watched] = one_run(cfg, comps, execu, Path(tmp) / f"{i}-{int(watched)}", watched)
                per_round.append(got[True][0] / got[False][0])
                whole.append(got[True][1] / got[False][1])
                print(
                    f"repeat {i + 1}: s/round bare {got[False][0]:.3f} watched {got[True][0]:.3f} "
                    f"(x{per_round[-1]:.3f}); run bare {got[False][1]:.2f} s watched {got[True][1]:.2f} s "
                    f"(x{whole[-1]:.3f})",
                    flush=True,
                )
    finally:
        close_executor(execu)
    med = statistics.median(per_round)
    print(
        f"executor: {type(execu).__name__}; W1 with {args.clients} clients, {args.rounds} rounds, {args.repeats} repeats"
    )
    print(
        f"watched / bare, seconds per round: median of paired ratios x{med:.3f} (target < 1.05: {'met' if med < 1.05 else 'NOT met'})"
    )
    print(
        f"watched / bare, whole run (start-up included): median of paired ratios x{statistics.median(whole):.3f}"
    )


if __name__ == "__main__":
    main()
