"""Tasks through ``fedloom simulate`` against the same loop hand-written, and against the floor.

An independent harness: every variant is a fresh process, timed from outside.

* ``bare``: the hand-written single-process loop (``handwritten.py --procs 1``,
  torch's default threads), plain PyTorch, no fedloom import;
* ``floor``: the same loop forked over one process per core with one torch
  thread each, the partial sums added after each round through shared memory,
  with no transport or aggregation (``handwritten.py --procs P``);
* ``fedloom``: ``python -m fedloom simulate --config exp.toml --set
  executor=parallel`` with ``task = "task_zoo:mnist"`` (a declarative task) or
  ``task = "mnist_custom:make"`` (the custom-loop example).

All three train the same clients on the same rows: the harness takes fedloom's
partition and cohorts and writes them to the plan file the hand-written loops
read. Each variant prints a line per round; the harness timestamps the lines as
they arrive. Per run it records:

* seconds per round: from the end of round 1 to the end of the last round,
  divided by the rounds in between (fedloom's last round also evaluates on the
  first 100 test examples, about a millisecond);
* start-up: from spawning the process to the end of round 1;
* peak PSS of the process tree (main process plus workers, sampled every 0.1 s
  from ``/proc/PID/smaps_rollup``), in runs of their own (``--memory-repeats``,
  after the timed ones): reading a process's ``smaps_rollup`` costs 3-6 ms of
  CPU and holds its memory-map lock, so sampling slows the run it samples, and
  fedloom's three processes more than the single loop's one.

The variants alternate (``bare, floor, fedloom``, then rotated by one each
repeat) and each record is the median over repeats of the ratio (or, for
start-up, the difference) paired within a repeat.

Families (``--families``): ``sgd`` (plain SGD, lr 0.05), ``momentum`` (SGD with
momentum 0.9, lr 0.01), ``adam`` (lr 0.001), ``custom`` (the custom-loop example:
Adam, clipping, cosine schedule, lr 0.001).

Workloads: W1 = 1000 Dirichlet(0.3) MNIST clients, 100 per round, 2NN, E=1,
B=20 (10 rounds); W2 = 10 IID MNIST clients, all per round, CNN, E=1, B=32
(3 rounds).

    PYTHONPATH=src python benchmarks/bench_tasks.py --workload w1 --repeats 5
    PYTHONPATH=src python benchmarks/bench_tasks.py --workload w2 --repeats 5
    PYTHONPATH=src python benchmarks/bench_tasks.py --tiny        # a smoke run of a few seconds per process
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import PeakPss

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

ROUND_LINE = re.compile(r"^round (\d+)\b(?: examples (\d+))?")
FAMILIES = {"sgd": 0.05, "momentum": 0.01, "adam": 0.001, "custom": 0.001}
TEST_SUBSET = 100


@dataclass(frozen=True)
class Workload:
    model: str
    num_clients: int
    partition: str
    fraction: float
    batch: int
    rounds: int
    alpha: float = 0.5


WORKLOADS = {
    "w1": Workload("2nn", 1000, "dirichlet", 0.1, 20, 10, alpha=0.3),
    "w2": Workload("cnn", 10, "iid", 1.0, 32, 3),
}


@dataclass
class Run:
    """One process's measurements."""

    per_round: float
    startup: float
    peak_mb: float
    examples: list[int]


@dataclass
class Records:
    runs: dict[str, list[Run]] = field(default_factory=dict)
    memory: dict[str, list[float]] = field(default_factory=dict)  # peak PSS (MB) of the memory runs

    def add(self, variant: str, run: Run) -> None:
        self.runs.setdefault(variant, []).append(run)


def experiment_file(path: Path, wl: Workload, family: str, args: argparse.Namespace) -> Path:
    if family == "custom":
        task = 'task = "mnist_custom:make"\n[task_args]\n'
        task += (
            f'data_dir = "{args.data_dir}"\ntrain_subset = {args.train_subset}\ntest_subset = {TEST_SUBSET}\n'
        )
    else:
        task = 'task = "task_zoo:mnist"\n[task_args]\n'
        task += f'model = "{wl.model}"\noptimizer = "{family}"\ndata_dir = "{args.data_dir}"\n'
        task += f"train_subset = {args.train_subset}\ntest_subset = {TEST_SUBSET}\n"
    path.write_text(
        f'rounds = {args.rounds}\nseed = 0\nexecutor = "parallel"\nworkers = {args.procs}\n{task}'
        f'[data]\nnum_clients = {args.num_clients}\npartition = "{wl.partition}"\nalpha = {wl.alpha}\n'
        f"[sampling]\nfraction = {wl.fraction}\n"
        f"[client]\nepochs = 1\nbatch_size = {wl.batch}\nlr = {FAMILIES[family]}\n"
        f"[eval]\nevery = {args.rounds + 1}\ntarget_accuracy = 0\n",
        encoding="utf-8",
    )
    return path


def env() -> dict[str, str]:
    paths = [ROOT / "src", HERE, ROOT / "examples" / "custom_loop"]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in paths)}


def write_plan(toml: Path, plan: Path, rounds: int) -> str:
    """fedloom's partition and cohorts for ``toml``, for the hand-written loops; returns the data source."""
    from fedloom.config import load_config
    from fedloom.sim.build import materialise_config
    from fedloom.sim.sampling import draw_cohort

    cfg = load_config(toml)
    mat = materialise_config(cfg, search=[HERE])
    train = mat.train
    indices = [np.asarray(train.client_indices(c)) for c in range(train.num_clients)]  # type: ignore[attr-defined]
    s = cfg.sampling
    cohorts = [
        draw_cohort(
            cfg.seed, r, train.num_clients, scheme=s.scheme, fraction=s.fraction, min_clients=s.min_clients
        )
        for r in range(1, rounds + 1)
    ]
    np.savez(
        plan,
        indices=np.concatenate(indices),
        offsets=np.concatenate([[0], np.cumsum([len(i) for i in indices])]),
        cohorts=np.stack(cohorts),
    )
    return mat.source


def resolve_data_dir(given: str, tmp: Path) -> str:
    """A directory with the four MNIST IDX files that both sides read.

    ``given`` if set; else the project's shared copy; else the files written
    into ``tmp`` from wherever fedloom finds MNIST.
    """
    if given:
        return given
    for shared in (
        ROOT.parent / "shared" / "data" / "mnist",
        ROOT.parent.parent / "shared" / "data" / "mnist",
    ):
        if (shared / "train-images-idx3-ubyte.gz").is_file():
            return str(shared)
    from fedloom.data.idx import encode_idx_uint8
    from fedloom.data.mnist import load_mnist_raw

    raw = load_mnist_raw(None, download=False)
    names = (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    )
    arrays = (raw.train_images, raw.train_labels, raw.test_images, raw.test_labels)
    for name, array in zip(names, arrays, strict=True):
        (tmp / name).write_bytes(encode_idx_uint8(array))
    return str(tmp)


def measure(
    cmd: Sequence[str], rounds: int, log: Path, metrics: Path | None = None, *, memory: bool = False
) -> Run:
    """Spawn ``cmd``; time its ``round N`` lines from the spawn; with ``memory``, sample its tree's PSS
    (``peak_mb`` is 0 otherwise).

    The examples trained per round come from the ``round N examples M`` lines,
    or from fedloom's ``metrics`` file.
    """
    stamps: dict[int, float] = {}
    examples: dict[int, int] = {}
    with log.open("w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=err, text=True, env=env(), cwd=ROOT)
        with PeakPss(proc.pid, every=0.1) if memory else nullcontext(None) as peak:
            assert proc.stdout is not None
            for line in proc.stdout:
                m = ROUND_LINE.match(line)
                if m:
                    stamps[int(m.group(1))] = time.perf_counter()
                    if m.group(2):
                        examples[int(m.group(1))] = int(m.group(2))
            proc.wait()
    if proc.returncode != 0 or sorted(stamps) != list(range(1, rounds + 1)):
        raise RuntimeError(
            f"{' '.join(cmd)} exited with {proc.returncode} after rounds {sorted(stamps)}:\n{log.read_text()}"
        )
    if metrics is not None:
        for line in metrics.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            examples[int(row["round"])] = int(row["num_examples"])
    return Run(
        (stamps[rounds] - stamps[1]) / (rounds - 1),
        stamps[1] - t0,
        peak.peak_mb if peak is not None else 0.0,
        [examples.get(r, -1) for r in range(1, rounds + 1)],
    )


def commands(
    toml: Path, plan: Path, wl: Workload, family: str, args: argparse.Namespace, out: Path
) -> dict[str, list[str]]:
    hand = [
        sys.executable, str(HERE / "handwritten.py"), "--plan", str(plan), "--data-dir", args.data_dir,
        "--model", wl.model, "--opt", family, "--lr", str(FAMILIES[family]), "--epochs", "1",
        "--batch", str(wl.batch), "--rounds", str(args.rounds),
    ]  # fmt: skip
    fed = [
        sys.executable, "-m", "fedloom", "simulate", "--config", str(toml), "--set", "executor=parallel",
        "--out", str(out), "--no-report",
    ]  # fmt: skip
    return {
        "bare": hand,
        "floor": [*hand, "--procs", str(args.procs)],
        "fedloom": fed,
    }


def median_ratio(a: list[Run], b: list[Run], key: str) -> tuple[float, list[float]]:
    ratios = [getattr(x, key) / getattr(y, key) for x, y in zip(a, b, strict=True)]
    return statistics.median(ratios), ratios


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(name: str, rec: Records, family: str, args: argparse.Namespace) -> None:
    fed, bare, floor = rec.runs["fedloom"], rec.runs["bare"], rec.runs["floor"]
    target = 1.03 if family == "sgd" else 1.10
    med = {v: statistics.median(r.per_round for r in runs) for v, runs in rec.runs.items()}
    r_floor, all_floor = median_ratio(fed, floor, "per_round")
    r_bare, all_bare = median_ratio(fed, bare, "per_round")
    f_bare, _ = median_ratio(floor, bare, "per_round")
    print(
        f"{name} {family} examples trained per round, the same in every run of every variant: {fed[0].examples}"
    )
    print(
        f"{name} {family} s/round (median): fedloom parallel {med['fedloom']:.4f}, floor ({args.procs} procs x 1 "
        f"thread) {med['floor']:.4f}, single-process loop {med['bare']:.4f}"
    )
    print(
        f"{name} {family} fedloom / floor: {r_floor:.3f} (target <= {target}: {verdict(r_floor <= target)}) "
        f"[{', '.join(f'{x:.3f}' for x in all_floor)}]"
    )
    print(
        f"{name} {family} fedloom / single-process loop: {r_bare:.3f} [{', '.join(f'{x:.3f}' for x in all_bare)}]; "
        f"floor / single-process loop: {f_bare:.3f}"
    )
    diffs = [f.startup - b.startup for f, b in zip(fed, bare, strict=True)]
    print(
        f"{name} {family} start-up (spawn to end of round 1, median): fedloom {statistics.median(r.startup for r in fed):.2f} s, "
        f"single-process loop {statistics.median(r.startup for r in bare):.2f} s, floor "
        f"{statistics.median(r.startup for r in floor):.2f} s; fedloom minus loop {statistics.median(diffs):+.2f} s "
        f"(target <= +1 s: {verdict(statistics.median(diffs) <= 1.0)}) [{', '.join(f'{d:+.2f}' for d in diffs)}]"
    )
    mem = rec.memory
    if not mem:
        return
    all_p = [f / b for f, b in zip(mem["fedloom"], mem["bare"], strict=True)]
    p_bare = statistics.median(all_p)
    print(
        f"{name} {family} peak PSS ({len(all_p)} runs each, median): fedloom {statistics.median(mem['fedloom']):.0f} MB, "
        f"single-process loop {statistics.median(mem['bare']):.0f} MB, floor "
        f"{statistics.median(mem['floor']):.0f} MB; fedloom / loop {p_bare:.3f} (target <= 1.2: {verdict(p_bare <= 1.2)}) "
        f"[{', '.join(f'{x:.3f}' for x in all_p)}]",
        flush=True,
    )


def profile(toml: Path, args: argparse.Namespace, tmp: Path, family: str) -> None:
    """Where fedloom's time goes: its main process under cProfile, once per executor.

    ``sequential`` runs every client in the main process with one torch thread,
    the same ``run_client`` path a parallel worker runs; ``parallel`` shows the
    main process of the parallel run (transport, aggregation, checkpoint, waiting).
    """
    import pstats

    for executor in ("sequential", "parallel"):
        prof = tmp / f"{family}-{executor}.prof"
        cmd = [
            sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "fedloom", "simulate", "--config", str(toml),
            "--set", f"executor={executor}", "--out", str(tmp / f"prof-{family}-{executor}"), "--no-report",
        ]  # fmt: skip
        run = measure(cmd, args.rounds, tmp / "profile.log")
        print(
            f"{args.workload} {family} cProfile of fedloom simulate, executor={executor}: {run.per_round:.4f} s/round"
        )
        stats = pstats.Stats(str(prof), stream=sys.stdout)
        stats.sort_stats("tottime").print_stats(args.profile)
        stats.sort_stats("cumulative").print_stats(args.profile)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="w1")
    ap.add_argument(
        "--families", default="", help="comma-separated; default sgd,momentum,adam,custom (w1), sgd (w2)"
    )
    ap.add_argument("--rounds", type=int, default=0, help="default: 10 (w1), 3 (w2)")
    ap.add_argument("--repeats", type=int, default=5, help="0 with --profile: profile only")
    ap.add_argument(
        "--memory-repeats",
        type=int,
        default=2,
        help="runs per variant that sample PSS (after the timed ones)",
    )
    ap.add_argument("--num-clients", type=int, default=0, help="default: the workload's")
    ap.add_argument(
        "--train-subset", type=int, default=0, help="partition only the first N training examples (0 = all)"
    )
    ap.add_argument(
        "--procs", type=int, default=os.cpu_count() or 1, help="floor processes and fedloom workers"
    )
    ap.add_argument(
        "--data-dir", default="", help="MNIST IDX files (default: the shared copy, else fedloom's)"
    )
    ap.add_argument(
        "--tiny", action="store_true", help="smoke run: W1 with 100 clients, 3 rounds, 1 repeat, sgd"
    )
    ap.add_argument(
        "--profile", type=int, default=0, help="after each family, print this many cProfile lines of fedloom"
    )
    args = ap.parse_args()
    wl = WORKLOADS[args.workload]
    if args.tiny:
        args.workload, wl = "w1", WORKLOADS["w1"]
        args.rounds, args.repeats, args.num_clients, args.families = 3, 1, 100, "sgd"
        args.memory_repeats = 1
    args.rounds = args.rounds or wl.rounds
    args.num_clients = args.num_clients or wl.num_clients
    families = [
        f
        for f in (args.families or ("sgd,momentum,adam,custom" if args.workload == "w1" else "sgd")).split(
            ","
        )
        if f
    ]
    if args.rounds < 2:
        ap.error("--rounds must be at least 2 (round 1 is start-up)")
    with tempfile.TemporaryDirectory(prefix="bench-tasks-") as tmp_:
        tmp = Path(tmp_)
        args.data_dir = resolve_data_dir(args.data_dir, tmp)
        plan = tmp / "plan.npz"
        source = write_plan(experiment_file(tmp / "plan.toml", wl, "sgd", args), plan, args.rounds)
        print(
            f"{args.workload}: {args.num_clients} clients, fraction {wl.fraction:g} per round, {wl.model}, E=1, "
            f"B={wl.batch}, {args.rounds} rounds, training examples {args.train_subset or 'all'}, {args.repeats} repeats, {args.procs} procs; data {source}",
            flush=True,
        )
        for family in families:
            toml = experiment_file(tmp / f"{family}.toml", wl, family, args)
            rec = Records()
            for rep in range(args.repeats):
                cmds = commands(toml, plan, wl, family, args, tmp / f"run-{family}-{rep}")
                order = ["bare", "floor", "fedloom"]
                order = order[rep % 3 :] + order[: rep % 3]
                line = []
                for variant in order:
                    out = tmp / f"run-{family}-{rep}" / "metrics.jsonl" if variant == "fedloom" else None
                    run = measure(cmds[variant], args.rounds, tmp / f"{variant}.log", out)
                    rec.add(variant, run)
                    line.append(f"{variant} {run.per_round:.4f} s/round, start {run.startup:.2f} s")
                print(f"  {family} repeat {rep + 1}: " + "; ".join(line), flush=True)
                trained = {v: runs[-1].examples for v, runs in rec.runs.items()}
                if len({tuple(e) for e in trained.values()}) != 1:
                    raise RuntimeError(f"the variants trained different examples per round: {trained}")
            for rep in range(args.memory_repeats if args.repeats else 0):
                cmds = commands(toml, plan, wl, family, args, tmp / f"mem-{family}-{rep}")
                order = ["bare", "floor", "fedloom"]
                for variant in order[rep % 3 :] + order[: rep % 3]:
                    run = measure(cmds[variant], args.rounds, tmp / f"{variant}.log", memory=True)
                    rec.memory.setdefault(variant, []).append(run.peak_mb)
                print(
                    f"  {family} memory run {rep + 1}: "
                    + "; ".join(f"{v} {rec.memory[v][-1]:.0f} MB" for v in ("bare", "floor", "fedloom")),
                    flush=True,
                )
            if rec.runs:
                report(args.workload, rec, family, args)
            if args.profile:
                profile(toml, args, tmp, family)


if __name__ == "__main__":
    main()
