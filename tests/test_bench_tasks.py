"""The task benchmark's smallest setting runs end to end, so the script cannot rot unnoticed."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import REPO, cli_env


def test_bench_tasks_tiny_reports_every_record(mnist_dir: str) -> None:
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_tasks.py"), "--tiny"]
    if mnist_dir:
        cmd += ["--data-dir", mnist_dir]
    done = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    # One timed repeat of the three variants, each with its own per-round time and start-up, then
    # one run of each that samples PSS.
    repeat = re.search(r"sgd repeat 1: (.*)", out)
    memory = re.search(r"sgd memory run 1: (.*)", out)
    assert repeat is not None, out
    assert memory is not None, out
    for variant in ("bare", "floor", "fedloom"):
        assert re.search(rf"{variant} [0-9.]+ s/round, start [0-9.]+ s", repeat.group(1)), out
        assert re.search(rf"{variant} [1-9][0-9]* MB", memory.group(1)), out
    for record in (
        "fedloom / floor: ",
        "fedloom / single-process loop: ",
        "fedloom minus loop ",
        "fedloom / loop ",
    ):
        assert re.search(re.escape(record) + r"[+-]?[0-9.]+", out), (record, out)
