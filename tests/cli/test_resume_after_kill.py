"""Kill a running ``fedloom simulate`` with SIGKILL, resume it, and compare with an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

from tests.conftest import cli_env, fedloom_cmd, run_cli

from fedloom.core.serde import params_from_bytes
from fedloom.results.store import RunStore

ROUNDS = 12


def _args(mnist_dir: str) -> list[str]:
    sets = [
        f"data.dir={mnist_dir}", f"rounds={ROUNDS}", "data.train_subset=12000", "data.test_subset=2000",
        "data.num_clients=20", "sampling.fraction=0.5", "eval.target_accuracy=0", "eval.every=3",
        "checkpoint.keep=2", "seed=7",
    ]  # fmt: skip
    return [a for s in sets for a in ("--set", s)]


def _rounds_done(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.endswith("}"))


def _processes_mentioning(text: str) -> list[int]:
    """Live (non-zombie) processes whose command line contains ``text``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path: Path, mnist_dir: str) -> None:
    whole = tmp_path / "whole"
    run_cli("simulate", *_args(mnist_dir), "--out", str(whole), "--no-report", cwd=tmp_path)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        fedloom_cmd("simulate", *_args(mnist_dir), "--out", str(killed), "--no-report"),
        cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while _rounds_done(killed) < 4 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # The parallel workers notice their parent's death and exit: no orphans are left behind.
    deadline = time.monotonic() + 20
    while _processes_mentioning(str(killed)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_mentioning(str(killed)) == [], "worker processes outlived the killed run"
    done = _rounds_done(killed)
    assert 4 <= done < ROUNDS, f"the kill landed after {done} rounds; expected mid-run"
    assert not (killed / "model.safetensors").exists()
    with RunStore(killed / "state.sqlite") as store:
        assert store.get_meta("status") == "running"
        assert store.latest_round() >= done - 1

    run_cli("simulate", "--resume", str(killed), "--no-report", cwd=tmp_path)

    a = params_from_bytes((whole / "model.safetensors").read_bytes())
    b = params_from_bytes((killed / "model.safetensors").read_bytes())
    assert a.equal(b), "resumed run's final model differs from the uninterrupted run's"
    rows_a = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows_b] == list(range(1, ROUNDS + 1))
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in rows_a]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in rows_b]
    with RunStore(killed / "state.sqlite") as store:
        assert store.get_meta("status") == "completed"


def test_same_seed_gives_bit_identical_runs(tmp_path: Path, mnist_dir: str) -> None:
    finals = []
    for name in ("a", "b"):
        run = tmp_path / name
        run_cli(
            "simulate", *_args(mnist_dir), "--set", "rounds=3", "--out", str(run), "--no-report", cwd=tmp_path
        )
        finals.append(params_from_bytes((run / "model.safetensors").read_bytes()))
    assert finals[0].equal(finals[1])
    other = tmp_path / "c"
    run_cli("simulate", *_args(mnist_dir), "--set", "rounds=3", "--set", "seed=8", "--out", str(other),
            "--no-report", cwd=tmp_path)  # fmt: skip
    assert not finals[0].equal(params_from_bytes((other / "model.safetensors").read_bytes()))
