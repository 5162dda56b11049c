"""``fedloom report`` on a real simulated run with per-site test data: numbers against the run's own files."""

from __future__ import annotations

import base64
import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from fedloom.config.loader import parse_config
from fedloom.engine.events import ClientAccepted, EpsilonSpent, read_events
from fedloom.results.report import write_report
from fedloom.sim.runner import run_simulation

HEART = {
    "seed": 2,
    "rounds": 3,
    "data": {"dataset": "heart_disease", "num_clients": 4},
    "client": {"lr": 0.05, "epochs": 1, "batch_size": 16},
    "sampling": {"fraction": 1.0, "min_clients": 4},
    "eval": {"target_accuracy": 0.0},
    "privacy": {"mode": "central", "noise_multiplier": 0.8, "clip_norm": 1.0, "budget_epsilon": 1e6},
}


@pytest.fixture(scope="module")
def heart_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("heart") / "run"
    run_simulation(parse_config(HEART), run_dir)
    return run_dir


def table(text: str, header_start: str) -> list[list[str]]:
    """The body rows of the first markdown table whose header starts with ``header_start``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def close(cell: str, value: Any) -> bool:
    if value is None:
        return cell == "—"
    if isinstance(value, bool):
        return cell == str(value).lower()
    if isinstance(value, str):
        return cell == value
    return float(cell) == pytest.approx(float(value), rel=1e-5, abs=1e-12)


def metrics_rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def check_html(out: Path, pngs: list[Path]) -> None:
    """One inlined image per plot, each the PNG's own bytes, and no reference outside the file."""
    page = (out / "report.html").read_text(encoding="utf-8")
    sources = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert len(sources) == len(pngs)
    assert sorted(base64.b64decode(s.removeprefix("data:image/png;base64,")) for s in sources) == sorted(
        p.read_bytes() for p in pngs
    )
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"https?://|<link|<script|@import|url\(", page)


def test_report_of_a_simulated_run_agrees_with_its_metrics_and_events(
    heart_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    report = write_report([heart_run], out)
    pngs = [p for p in report.paths if p.suffix == ".png"]
    assert [p.name for p in pngs] == [
        "accuracy.png",
        "loss.png",
        "sites.png",
        "site-distribution.png",
        "privacy.png",
        "participation.png",
    ]
    check_html(out, pngs)
    rows = metrics_rows(heart_run)
    last = rows[-1]
    text = (out / "summary.md").read_text(encoding="utf-8")

    # The last round's table holds the last row's values, every scalar of it.
    shown = dict(table(text, "| metric | value |"))
    scalars = {k: v for k, v in last.items() if not isinstance(v, dict)}
    assert set(shown) == set(scalars)
    for k, v in scalars.items():
        assert close(shown[k], v), k
    # The per-site table: each site's own test split, as recorded.
    sites = {r[0]: r for r in table(text, "| site | examples | loss |")}
    assert set(sites) == set(last["sites"]) == {"cleveland", "hungarian", "switzerland", "va"}
    for name, cells in sites.items():
        rec = last["sites"][name]
        assert close(cells[1], rec["num_examples"])
        assert close(cells[2], rec["loss"])
        assert close(cells[3], rec["accuracy"])
    # The distribution across sites, per round.
    dist = table(text, "| round | weighted mean | min |")
    assert [int(r[0]) for r in dist] == [1, 2, 3]
    for cells, row in zip(dist, rows, strict=True):
        for cell, key in zip(cells[1:], ("", "_min", "_p10", "_median", "_max"), strict=True):
            assert close(cell, row[f"site_accuracy{key}"])
    # Privacy: the epsilon spent after the last round, against the budget.
    events = list(read_events(heart_run / "events.jsonl"))
    spent = [e for e in events if isinstance(e, EpsilonSpent)]
    assert spent[-1].epsilon == pytest.approx(last["epsilon"])
    assert f"epsilon spent after round 3: {last['epsilon']:.6g} of the budget 1e+06." in text
    # Participation per round, from the events.
    part = table(text, "| round | selected | accepted |")
    for cells in part:
        r = int(cells[0])
        accepted = [e for e in events if isinstance(e, ClientAccepted) and e.round == r]
        assert int(cells[2]) == len(accepted) == next(m for m in rows if m["round"] == r)["num_clients"]
        assert int(cells[1]) == 4
        assert (cells[3], cells[4]) == ("0", "0")


def test_report_of_a_run_still_going(heart_run: Path, tmp_path: Path) -> None:
    """A torn last line in metrics.jsonl and events.jsonl, and a writer holding the database."""
    import shutil

    run = tmp_path / "live"
    shutil.copytree(heart_run, run)
    rows = metrics_rows(run)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"round": 4, "train_lo')
    with (run / "events.jsonl").open("a") as f:
        f.write('{"type": "round_opened", "rou')
    writer = sqlite3.connect(run / "state.sqlite")
    try:
        writer.execute("BEGIN IMMEDIATE")  # a live run's write lock
        writer.execute("UPDATE meta SET value = 'running' WHERE key = 'status'")
        report = write_report([run], tmp_path / "out")
    finally:
        writer.rollback()
        writer.close()
    assert report.runs[0].summary.rounds_run == rows[-1]["round"] == 3
    text = (tmp_path / "out" / "summary.md").read_text(encoding="utf-8")
    assert "Last round's metrics (round 3)" in text
    assert "status completed" in text  # the database as of its last commit
