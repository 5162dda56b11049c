"""A real ``fedloom simulate --dashboard`` run watched in headless Chromium: the page advances live."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tests.conftest import cli_env, fedloom_cmd
from tests.dashboard.cdp import Chromium, find_chromium

ARGS = [
    *("--set", "data.dataset=heart_disease", "--set", "data.num_clients=4", "--set", "rounds=400"),
    *("--set", "client.epochs=4", "--set", "executor=sequential", "--no-report"),
]  # about a quarter second a round: slow enough to watch
CURVE = "document.querySelector('#chart-accuracy polyline[data-series=\"test_accuracy\"]')"


def _start_run(out: Path) -> tuple[subprocess.Popen[bytes], str]:
    log = out / "simulate.log"  # a file, not a pipe: a pipe nobody drains would stall the run
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            fedloom_cmd("simulate", *ARGS, "--out", str(out / "run"), "--dashboard", "--dashboard-port", "0"),
            cwd=out,
            env=cli_env(),
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("dashboard: "):
                return proc, line.split(" ", 1)[1].strip()
        time.sleep(0.2)
    _stop(proc)
    raise AssertionError("no dashboard URL printed:\n" + log.read_text(encoding="utf-8", errors="replace"))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


def _wait_for(browser: Chromium, expression: str, timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = browser.evaluate(expression)
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {expression}")


def _observe(browser: Chromium) -> tuple[int, int, list[list[float]]]:
    """(the page's round counter, points of its test-accuracy curve, the series it plots)."""
    raw = browser.evaluate(
        "JSON.stringify([document.getElementById('round').textContent, "
        f"({CURVE} || {{getAttribute: () => ''}}).getAttribute('points'), S.global.test_accuracy || []])"
    )
    counter, points, series = json.loads(raw)
    return int(counter), len(points.split()), series


def test_page_advances_during_a_real_run(tmp_path: Path) -> None:
    find_chromium()  # a clear failure, before starting anything, when there is no browser
    proc, url = _start_run(tmp_path)
    browser = None
    try:
        assert url.startswith("http://127.0.0.1:")
        assert "token=" not in url  # loopback: no token
        browser = Chromium(tmp_path / "profile", width=1280, height=1000)
        browser.goto(url)
        _wait_for(browser, "+document.getElementById('round').textContent >= 2")
        round1, points1, _ = _observe(browser)
        _wait_for(browser, f"+document.getElementById('round').textContent >= {round1 + 3}")
        round2, points2, series = _observe(browser)
        assert round2 > round1 >= 2
        assert points2 > points1 >= 2
        rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        # The page plots exactly what metrics.jsonl holds, one point per committed round (what it
        # has received may run a render ahead of what it shows).
        assert points2 == round2 <= len(series) <= len(rows)
        assert series == [[row["round"], row["test_accuracy"]] for row in rows[: len(series)]]
        assert browser.evaluate("document.getElementById('rounds').textContent") == "400"
        assert browser.evaluate("document.getElementById('status').textContent") == "running"

        png = browser.screenshot()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.float64)
        box = json.loads(
            browser.evaluate(
                "JSON.stringify(document.getElementById('chart-accuracy').getBoundingClientRect())"
            )
        )
        area = image[int(box["top"]) : int(box["bottom"]), int(box["left"]) : int(box["right"])]
        assert area.size > 0
        assert area.std() > 10, "the curve area of the screenshot is blank"
        # The test-accuracy curve's own colour covers a good part of the chart.
        stroke = browser.evaluate(f"{CURVE}.getAttribute('stroke')")
        rgb = np.array([int(stroke[i : i + 2], 16) for i in (1, 3, 5)])
        curve = np.all(np.abs(area - rgb) < 40, axis=-1)
        assert curve.sum() > 100
    finally:
        if browser is not None:
            browser.close()
        _stop(proc)
