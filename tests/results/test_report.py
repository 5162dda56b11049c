"""Tests of ``fedloom.results.report`` on hand-made run directories with golden numbers."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest
import tomli_w

from fedloom.core.errors import RunStateError
from fedloom.results.report import RunSummary, run_labels, summarize_run, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _config(lr: float = 0.05, target: float = 0.7, **top: Any) -> dict[str, Any]:
    return {
        "seed": 0,
        "rounds": 5,
        "out_dir": "runs",
        **top,
        "data": {"num_clients": 10, "partition": "dirichlet", "alpha": 0.5, "dir": "/data"},
        "model": {"name": "2nn", "kwargs": {}},
        "client": {"lr": lr, "epochs": 1, "batch_size": 10},
        "algorithm": {"name": "fedavg"},
        "eval": {"target_accuracy": target, "every": 2},
    }


# Five rounds, evaluated on rounds 2, 4 and 5; seconds 1..5 (total 15, mean 3).
# With target 0.7: reached first at round 4; best 0.8 at round 4; final 0.75.
METRICS: list[dict[str, Any]] = [
    {"round": 1, "train_loss": 2.0, "num_clients": 3, "seconds": 1.0},
    {"round": 2, "train_loss": 1.5, "num_clients": 3, "seconds": 2.0, "test_accuracy": 0.5, "test_loss": 1.6},
    {"round": 3, "train_loss": 1.0, "num_clients": 3, "seconds": 3.0},
    {"round": 4, "train_loss": 0.7, "num_clients": 3, "seconds": 4.0, "test_accuracy": 0.8, "test_loss": 0.9},
    {"round": 5, "train_loss": 0.6, "num_clients": 3, "seconds": 5, "test_accuracy": 0.75, "test_loss": 1.0},
]


def _make_run(root: Path, name: str, config: dict[str, Any], metrics: list[dict[str, Any]]) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_bytes(tomli_w.dumps(config).encode())
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return run_dir


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    height, width = image.shape[:2]
    assert width > 100
    assert height > 100
    assert float(image.std()) > 0  # not a blank canvas


def test_summarize_run_golden_numbers() -> None:
    assert summarize_run(METRICS, target=0.7) == RunSummary(
        rounds_run=5,
        final_accuracy=0.75,
        best_accuracy=0.8,
        best_round=4,
        rounds_to_target=4,
        total_seconds=15.0,
        mean_seconds=3.0,
    )


def test_summarize_run_target_reached_exactly_counts() -> None:
    assert summarize_run(METRICS, target=0.5).rounds_to_target == 2


@pytest.mark.parametrize("target", [0.0, 0.81])
def test_summarize_run_target_absent_or_not_reached(target: float) -> None:
    assert summarize_run(METRICS, target=target).rounds_to_target is None


def test_summarize_run_without_evaluation() -> None:
    rows = [{"round": r, "train_loss": 1.0, "seconds": 0.5} for r in (1, 2)]
    summary = summarize_run(rows, target=0.9)
    assert summary.final_accuracy is None
    assert summary.best_accuracy is None
    assert summary.best_round is None
    assert summary.rounds_to_target is None
    assert summary.mean_seconds == pytest.approx(0.5)


def test_summarize_run_orders_rounds_and_keeps_last_duplicate() -> None:
    rows = [*reversed(METRICS), {**METRICS[3], "test_accuracy": 0.6, "seconds": 10.0}]
    summary = summarize_run(rows, target=0.7)
    assert summary.best_accuracy == 0.75
    assert summary.best_round == 5
    assert summary.rounds_to_target == 5
    assert summary.final_accuracy == 0.75
    assert summary.total_seconds == pytest.approx(21.0)
    assert summary.mean_seconds == pytest.approx(21.0 / 5)


def test_summarize_run_rejects_empty_and_bad_rows() -> None:
    with pytest.raises(ValueError, match="empty"):
        summarize_run([], target=0.5)
    with pytest.raises(ValueError, match="'seconds'"):
        summarize_run([{"round": 1, "train_loss": 1.0}], target=0.5)


def test_run_labels() -> None:
    assert run_labels(["only"], [_config()]) == ["only"]
    # out_dir and data.dir differ too but are paths, not experiment settings.
    b = _config(lr=0.1, out_dir="elsewhere")
    b["data"]["dir"] = "/other"
    assert run_labels(["a", "b"], [_config(), b]) == ["a (client.lr=0.05)", "b (client.lr=0.1)"]
    many = _config(lr=0.1, target=0.9, seed=1, rounds=7)
    expected = "b (client.lr=0.1, eval.target_accuracy=0.9, rounds=7, +1 more)"
    assert run_labels(["a", "b"], [_config(), many])[1] == expected
    assert run_labels(["x", "x"], [_config(), _config()]) == ["x", "x [2]"]


def test_single_run_report(tmp_path: Path) -> None:
    run_dir = _make_run(tmp_path, "run-a", _config(), METRICS)
    out = tmp_path / "out" / "nested"
    report = write_report([run_dir], out)

    assert report.paths == (out / "accuracy.png", out / "loss.png", out / "summary.md", out / "report.html")
    for png in report.paths[:2]:
        _assert_png(png)
    (run,) = report.runs
    assert run.label == "run-a"
    assert (run.algorithm, run.model, run.partition, run.target) == ("fedavg", "2nn", "dirichlet", 0.7)
    text = (out / "summary.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| run-a "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == [
        "run-a",
        "fedavg",
        "2nn",
        "dirichlet",
        "5",
        "0.7500",
        "0.8000 (round 4)",
        "4 (0.7)",
        "15.00",
        "3.000",
    ]
    assert "(accuracy.png)" in text
    assert "(loss.png)" in text


def test_two_runs_overlaid_with_differing_key(tmp_path: Path) -> None:
    slow = [{**m, "test_accuracy": 0.4} if "test_accuracy" in m else m for m in METRICS]
    a = _make_run(tmp_path, "run-a", _config(lr=0.05), METRICS)
    b = _make_run(tmp_path, "run-b", _config(lr=0.1), slow)
    report = write_report([a, b], tmp_path / "report")

    labels = [r.label for r in report.runs]
    assert labels == ["run-a (client.lr=0.05)", "run-b (client.lr=0.1)"]
    text = (tmp_path / "report" / "summary.md").read_text()
    assert "| run-a (client.lr=0.05) |" in text
    assert "| run-b (client.lr=0.1) |" in text
    assert "not reached (0.7)" in text
    for png in report.paths[:2]:
        _assert_png(png)


def test_run_without_target_or_test_loss(tmp_path: Path) -> None:
    rows = [{k: v for k, v in m.items() if k != "test_loss"} for m in METRICS]
    run_dir = _make_run(tmp_path, "r", _config(target=0.0), rows)
    report = write_report([run_dir], run_dir)
    assert report.runs[0].summary.rounds_to_target is None
    assert "no target" in (run_dir / "summary.md").read_text()
    _assert_png(run_dir / "loss.png")


def test_missing_run_dir(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(RunStateError, match="nope"):
        write_report([missing], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["metrics.jsonl", "config.toml"])
def test_missing_run_file(tmp_path: Path, name: str) -> None:
    run_dir = _make_run(tmp_path, "run-a", _config(), METRICS)
    (run_dir / name).unlink()
    with pytest.raises(RunStateError, match=re.escape(name)):
        write_report([run_dir], tmp_path / "out")


def test_corrupt_metrics_line_names_file_and_line(tmp_path: Path) -> None:
    run_dir = _make_run(tmp_path, "run-a", _config(), METRICS)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][:15]  # a line cut short by a crash
    lines[3] = json.dumps({"round": 4, "train_loss": "high", "seconds": 1.0})
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(RunStateError) as info:
        write_report([run_dir], tmp_path / "out")
    message = str(info.value)
    assert f"{run_dir / 'metrics.jsonl'}:3: not valid JSON" in message
    assert f"{run_dir / 'metrics.jsonl'}:4: 'train_loss'" in message
    assert not (tmp_path / "out").exists()


def test_corrupt_config(tmp_path: Path) -> None:
    run_dir = _make_run(tmp_path, "run-a", _config(), METRICS)
    (run_dir / "config.toml").write_text("seed = = 1\n")
    with pytest.raises(RunStateError, match=r"config\.toml"):
        write_report([run_dir], tmp_path / "out")


def test_empty_metrics_and_no_runs(tmp_path: Path) -> None:
    run_dir = _make_run(tmp_path, "run-a", _config(), [])
    with pytest.raises(RunStateError, match="no rounds"):
        write_report([run_dir], tmp_path / "out")
    with pytest.raises(RunStateError, match="no run directories"):
        write_report([], tmp_path / "out")
