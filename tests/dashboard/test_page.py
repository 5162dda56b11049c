"""The page in headless Chromium folds every kind of event into what it shows, and shows names as text."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tests.dashboard.cdp import Chromium

from fedloom.dashboard import start_dashboard

HOSTILE = "<img src=x onerror=window.__pwned=1>"


def _write(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _events() -> list[dict[str, Any]]:
    t = {"time": 1.0}
    return [
        {
            "type": "run_started",
            "round": 1,
            "rounds": 5,
            "runtime": "deployment",
            "resumed": False,
            "info": {},
            **t,
        },
        {"type": "round_opened", "round": 1, **t},
        {"type": "clients_selected", "round": 1, "clients": ["a", "b"], **t},
        {"type": "client_accepted", "round": 1, "client": "a", "examples": 4, "bytes": 0, **t},
        {"type": "client_accepted", "round": 1, "client": "b", "examples": 4, "bytes": 0, **t},
        {
            "type": "round_committed",
            "round": 1,
            "metrics": {"round": 1, "test_accuracy": 0.5, "num_clients": 2},
            **t,
        },
        {"type": "round_opened", "round": 2, **t},
        {"type": "clients_selected", "round": 2, "clients": ["a", HOSTILE, "c"], **t},
        {"type": "client_accepted", "round": 2, "client": "a", "examples": 4, "bytes": 0, **t},
        {"type": "client_rejected", "round": 2, "client": HOSTILE, "reason": "update norm 9e9 > 10", **t},
        {"type": "client_dropped", "round": 2, "client": "c", "reason": "deadline passed", **t},
        {"type": "epsilon_spent", "round": 2, "epsilon": 1.5, "delta": 1e-5, "budget": 8.0, **t},
        {"type": "bytes_moved", "round": 2, "down": 3000, "up": 200, **t},
        {
            "type": "round_committed",
            "round": 2,
            "metrics": {
                "round": 2,
                "test_accuracy": 0.625,
                "train_loss": 2.0,
                "epsilon": 1.5,
                "secagg_dropouts": 1,
                "num_clients": 1,
                "sites": {HOSTILE: {"accuracy": 0.25, "num_examples": 4}, "a": {"accuracy": 0.75}},
            },
            **t,
        },
        {"type": "run_stopped", "round": 2, "reason": "round budget reached", "failed": False, **t},
    ]


def _text(browser: Chromium, element: str) -> str:
    return str(browser.evaluate(f"document.getElementById('{element}').textContent"))


def _settle(browser: Chromium, expression: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not browser.evaluate(expression):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        time.sleep(0.1)


def test_page_shows_every_event_kind_and_escapes_names(tmp_path: Path) -> None:
    events_dir, metrics_dir = tmp_path / "events", tmp_path / "metrics"
    events_dir.mkdir()
    metrics_dir.mkdir()
    _write(events_dir / "events.jsonl", _events())
    rows = [
        {"round": 1, "test_accuracy": 0.5, "num_clients": 3},
        {"round": 2, "test_accuracy": 0.75, "num_clients": 2},
    ]
    _write(metrics_dir / "metrics.jsonl", rows)
    boards = [start_dashboard(events_dir), start_dashboard(metrics_dir)]
    browser = Chromium(tmp_path / "profile")
    try:
        browser.goto(boards[0].url)
        _settle(browser, "document.getElementById('status').textContent === 'stopped'")
        assert _text(browser, "round") == "2"
        assert _text(browser, "rounds") == "5"
        assert "round budget reached" in _text(browser, "phase")
        assert _text(browser, "c-seen") == "4"  # a, b, c and the hostile name
        assert [_text(browser, f"c-{k}") for k in ("selected", "accepted", "rejected", "dropped")] == [
            "3",
            "1",
            "1",
            "1",
        ]
        assert _text(browser, "c-secagg") == "1 (total 1)"
        assert _text(browser, "c-eps") == "1.50 / 8"
        assert _text(browser, "c-bytes") == "↓3000 ↑200"
        rows_text = browser.evaluate("[...document.querySelectorAll('#problems tr')].map(r => r.textContent)")
        assert rows_text == ["2cdroppeddeadline passed", f"2{HOSTILE}rejectedupdate norm 9e9 > 10"]
        assert HOSTILE in _text(browser, "legend-sites")  # shown as text ...
        assert browser.evaluate("document.querySelectorAll('img').length") == 0  # ... never as markup
        assert browser.evaluate("window.__pwned === undefined")
        points = browser.evaluate(
            "document.querySelector('#chart-accuracy polyline[data-series=\"test_accuracy\"]').getAttribute('points')"
        )
        assert len(points.split()) == 2
        assert browser.evaluate("document.getElementById('chart-privacy').closest('section').hidden") is False
        assert (
            browser.evaluate("document.querySelectorAll('#chart-privacy line[stroke-dasharray]').length") == 1
        )

        browser.goto(boards[1].url)  # only metrics.jsonl: its rows still drive the page
        _settle(browser, "document.getElementById('round').textContent === '2'")
        assert _text(browser, "status") == "running"
        assert _text(browser, "c-accepted") == "2"
        assert browser.evaluate("S.global.test_accuracy") == [[1, 0.5], [2, 0.75]]
        assert browser.evaluate("document.getElementById('chart-privacy').closest('section').hidden") is True
    finally:
        browser.close()
        for b in boards:
            b.close()
