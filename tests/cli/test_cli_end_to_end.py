"""The CLI as a user runs it: a real process on an MNIST slice writing metrics, model, plots."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from tests.conftest import run_cli

from fedloom.config import load_config
from fedloom.core.serde import params_from_bytes
from fedloom.results.store import RunStore

SLICE = (
    "--set", "data.train_subset=3000", "--set", "data.test_subset=1000", "--set", "data.num_clients=10",
    "--set", "sampling.fraction=0.3", "--set", "eval.target_accuracy=0",
)  # fmt: skip


def test_simulate_writes_the_run_directory(tmp_path: Path, mnist_dir: str) -> None:
    run = tmp_path / "run"
    proc = run_cli("simulate", "--set", "rounds=3", "--set", f"data.dir={mnist_dir}",
                   *SLICE, "--set", "eval.every=2", "--out", str(run), cwd=tmp_path)  # fmt: skip
    assert "results:" in proc.stdout
    # config.toml: resolved, every default filled in, and loadable as an experiment file.
    resolved = tomllib.loads((run / "config.toml").read_text())
    assert resolved["rounds"] == 3
    assert resolved["client"]["lr"] == load_config(None).client.lr
    assert load_config(run / "config.toml").data.train_subset == 3000
    # metrics.jsonl: one object per round, test metrics on evaluated rounds (2, and the last round 3).
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert {"round", "train_loss", "num_clients", "seconds"} <= r.keys()
        assert r["num_clients"] == 3
    assert "test_accuracy" not in rows[0]
    assert 0.3 < rows[2]["test_accuracy"] <= 1.0
    assert rows[2]["test_loss"] > 0
    # model.safetensors equals the last checkpoint in the SQLite state database.
    model = params_from_bytes((run / "model.safetensors").read_bytes())
    with RunStore(run / "state.sqlite") as store:
        assert store.latest_round() == 3
        assert store.get_meta("status") == "completed"
        assert store.load_state().params.equal(model)
    # Plots and summary written by default.
    for name in ("accuracy.png", "loss.png", "summary.md"):
        assert (run / name).stat().st_size > 0
    assert (run / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_overlays_runs_and_partition_prints_stats(tmp_path: Path, mnist_dir: str) -> None:
    runs = []
    for lr in ("0.05", "0.1"):
        run = tmp_path / f"lr{lr}"
        run_cli("simulate", "--set", "rounds=2", "--set", f"data.dir={mnist_dir}", *SLICE,
                "--set", f"client.lr={lr}", "--out", str(run), "--no-report", cwd=tmp_path)  # fmt: skip
        runs.append(str(run))
    out = tmp_path / "cmp"
    run_cli("report", *runs, "--out", str(out), cwd=tmp_path)
    summary = (out / "summary.md").read_text()
    assert "client.lr=0.05" in summary
    assert "client.lr=0.1" in summary
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"

    proc = run_cli("partition", "--set", f"data.dir={mnist_dir}", *SLICE, "--set", "data.partition=shards",
                   cwd=tmp_path)  # fmt: skip
    assert "clients: 10" in proc.stdout
    assert "shards" in proc.stdout


def test_bad_inputs_fail_with_clear_messages(tmp_path: Path, mnist_dir: str) -> None:
    proc = run_cli("simulate", "--set", "client.lr=-1", "--set", "data.bogus=1", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "client.lr = -1" in proc.stderr
    assert "data.bogus" in proc.stderr
    # More shards than examples: 50 clients x 2 shards of at least one example need 100 examples.
    proc = run_cli("simulate", "--set", f"data.dir={mnist_dir}", "--set", "data.train_subset=60",
                   "--set", "data.partition=shards", "--set", "data.num_clients=50", "--out", str(tmp_path / "x"),
                   cwd=tmp_path, check=False)  # fmt: skip
    assert proc.returncode == 2
    assert "shard" in proc.stderr
    # A data directory that does not exist.
    proc = run_cli("simulate", "--set", f"data.dir={tmp_path / 'nowhere'}", "--out", str(tmp_path / "y"),
                   cwd=tmp_path, check=False)  # fmt: skip
    assert proc.returncode == 2
    assert "is not a directory" in proc.stderr
    # Resuming something that is not a run directory.
    proc = run_cli("simulate", "--resume", str(tmp_path), cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "not a run directory" in proc.stderr


def test_nan_loss_stops_with_last_good_checkpoint_intact(tmp_path: Path, mnist_dir: str) -> None:
    run = tmp_path / "nan"
    proc = run_cli("simulate", "--set", f"data.dir={mnist_dir}", *SLICE, "--set", "rounds=5",
                   "--set", "client.lr=1e6", "--out", str(run), cwd=tmp_path, check=False)  # fmt: skip
    assert proc.returncode == 2
    assert "training loss became" in proc.stderr
    assert "last good checkpoint" in proc.stderr
    with RunStore(run / "state.sqlite") as store:
        assert store.get_meta("status") == "failed"
        last = store.latest_round()
        assert last >= 0
        assert store.load_state().params.all_finite()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == last


def test_simulate_logs_the_executor_choice_and_reason(tmp_path: Path, mnist_dir: str) -> None:
    proc = run_cli("simulate", "--set", f"data.dir={mnist_dir}", *SLICE, "--set", "rounds=1",
                   "--set", "executor=sequential", "--out", str(tmp_path / "r"), "--no-report",
                   cwd=tmp_path)  # fmt: skip
    assert "executor: sequential" in proc.stdout
    assert "requested in the configuration" in proc.stdout
