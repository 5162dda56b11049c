"""The tutorials in docs/tutorials are run as written: every code block, in order.

A fenced block whose info string has ``title="FILE"`` is written to FILE in a fresh working
directory; every other ``bash`` block is run, all of them concatenated into one
``bash -euo pipefail`` script, so a failing command fails the test. The working directory holds a
link to the repository's ``examples/``; ``fedloom`` and ``python`` on PATH run this interpreter
with the checkout's sources. The one substitution: the tutorials' port 8470 becomes a free port,
so a run does not collide with another server on this machine. Each test then checks what the run
left behind against values computed here, independently of the tutorial's own output.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.conftest import cli_env

REPO = Path(__file__).resolve().parents[1]
TUTORIALS = REPO / "docs" / "tutorials"
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", flags=re.S | re.M)


@dataclass(frozen=True)
class Tutorial:
    files: dict[str, str]
    script: str


def parse(name: str) -> Tutorial:
    """Split a tutorial into the files it asks the reader to save and the commands it runs."""
    files: dict[str, str] = {}
    commands: list[str] = []
    for lang, info, body in FENCE.findall((TUTORIALS / name).read_text(encoding="utf-8")):
        title = re.search(r'title="([^"]+)"', info)
        if title is not None:
            files[title.group(1)] = body
        elif lang == "bash":
            commands.append(body)
    return Tutorial(files, "\n".join(commands))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_tutorial(
    name: str, workdir: Path, timeout: float, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    tutorial = parse(name)
    for filename, text in tutorial.files.items():
        (workdir / filename).write_text(text, encoding="utf-8")
    (workdir / "examples").symlink_to(REPO / "examples", target_is_directory=True)
    bin_dir = workdir / ".bin"
    bin_dir.mkdir()
    for command, prefix in (("fedloom", "-m fedloom "), ("python", "")):
        (bin_dir / command).write_text(f'#!/bin/sh\nexec "{sys.executable}" {prefix}"$@"\n')
        (bin_dir / command).chmod(0o755)
    env = cli_env()
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env.update(extra_env or {})
    script = tutorial.script.replace("8470", str(_free_port()))
    proc = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the tutorial's background server and clients share this group
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if result.returncode != 0:
        logs = "".join(f"\n--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(workdir.glob("*.log")))
        raise AssertionError(f"{name} failed ({result.returncode}):\n{out[-3000:]}\n{err[-3000:]}{logs}")
    return result


def _metrics(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def test_every_tutorial_is_parsed_into_files_and_commands() -> None:
    names = sorted(p.name for p in TUTORIALS.glob("*.md"))
    assert names == ["dp-secagg.md", "four-hospitals.md", "own-task.md"]
    for name in names:
        tutorial = parse(name)
        assert "fedloom " in tutorial.script, name
        for filename in tutorial.files:
            assert filename.endswith((".py", ".toml")), (name, filename)


@pytest.mark.slow
def test_own_task_tutorial(tmp_path: Path) -> None:
    import torch

    result = run_tutorial("own-task.md", tmp_path, timeout=400)
    # The task the reader saved, rebuilt here: its central test set is what test_accuracy is on.
    sys.path.insert(0, str(tmp_path))
    try:
        import my_task  # type: ignore[import-not-found]

        task = my_task.make()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("my_task", None)
    from fedloom.core.serde import params_from_bytes

    for algorithm in ("fedavg", "fedprox", "scaffold"):
        rows = _metrics(tmp_path / "runs" / algorithm / "metrics.jsonl")
        assert [r["round"] for r in rows] == list(range(1, 21))
        assert [r["round"] for r in rows if "test_f1" in r] == [5, 10, 15, 20]
        model = task.model()
        params = params_from_bytes((tmp_path / "runs" / algorithm / "model.safetensors").read_bytes())
        model.load_state_dict({k: params[k] for k in params})
        test = task.data.test
        with torch.no_grad():
            acc = float((model(test.x).argmax(dim=1) == test.y).double().mean())
        assert rows[-1]["test_accuracy"] == pytest.approx(acc, abs=1e-12)
    assert "partition: dirichlet; clients: 20" in result.stdout
    summary = (tmp_path / "compare" / "summary.md").read_text(encoding="utf-8")
    assert all(f"runs/{a}" in summary for a in ("fedavg", "fedprox", "scaffold"))
    assert (tmp_path / "compare" / "accuracy.png").stat().st_size > 0
    # The script's FedAvg run is the CLI's FedAvg run: same seed, same settings.
    fedavg_line = next(line for line in result.stdout.splitlines() if line.startswith("fedavg ["))
    cli = [(r["round"], round(float(r["test_accuracy"]), 3)) for r in rows_of(tmp_path, "fedavg")]
    assert fedavg_line == f"fedavg {cli}"


def rows_of(workdir: Path, run: str) -> list[dict[str, object]]:
    return [r for r in _metrics(workdir / "runs" / run / "metrics.jsonl") if "test_accuracy" in r]


@pytest.mark.slow
def test_four_hospitals_tutorial(tmp_path: Path) -> None:
    pytest.importorskip("grpc")
    from fedloom.core.serde import params_from_bytes

    result = run_tutorial("four-hospitals.md", tmp_path, timeout=500)
    deployed = params_from_bytes((tmp_path / "runs" / "heart" / "model.safetensors").read_bytes())
    simulated = params_from_bytes((tmp_path / "runs" / "heart-sim" / "model.safetensors").read_bytes())
    assert deployed.equal(simulated)
    assert result.stdout.splitlines()[-1] == "identical"
    rows = _metrics(tmp_path / "runs" / "heart" / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(1, 11))
    assert all(r["num_clients"] == 4 for r in rows)
    # 4 hospitals x 10 rounds accepted, counted by the tutorial's grep.
    assert "\n40\n" in f"\n{result.stdout}"
    assert (tmp_path / "certs" / "clients" / "va" / "key.pem").is_file()


@pytest.mark.slow
def test_dp_secagg_tutorial(tmp_path: Path, mnist_dir: str) -> None:
    pytest.importorskip("grpc")
    pytest.importorskip("dp_accounting")
    from fedloom.privacy import FixedSizeSampling, calibrate_noise_multiplier, epsilon

    # Where the suite finds MNIST is where the reader's fedloom finds it (here: $FEDLOOM_DATA).
    result = run_tutorial(
        "dp-secagg.md", tmp_path, timeout=500, extra_env={"FEDLOOM_DATA": mnist_dir} if mnist_dir else None
    )
    rows = _metrics(tmp_path / "runs" / "dp-secagg" / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(1, 11))
    assert all(r["num_clients"] == 100 and r["secagg_bytes_up"] > 0 for r in rows)
    # The accountant, asked here: sigma calibrated for 10 rounds of 100 out of 1000 at delta 1e-5.
    sampling = FixedSizeSampling(cohort=100, population=1000)
    sigma = calibrate_noise_multiplier(4.0, 1e-5, 10, sampling)
    for r in rows:
        assert r["epsilon"] == pytest.approx(epsilon(sigma, sampling, int(r["round"]), 1e-5), rel=1e-9)
    assert float(rows[-1]["epsilon"]) <= 4.0
    assert [r["round"] for r in rows if "test_accuracy" in r] == [5, 10]

    deployed = _metrics(tmp_path / "runs" / "heart-dp" / "metrics.jsonl")
    assert [r["round"] for r in deployed] == list(range(1, 11))
    assert all(r["num_clients"] == 4 and "secagg_error_bound" in r for r in deployed)
    # Four of four hospitals every round: no amplification, sigma = 1 composed over 10 rounds.
    full = FixedSizeSampling(cohort=4, population=4)
    assert deployed[-1]["epsilon"] == pytest.approx(epsilon(1.0, full, 10, 1e-5), rel=1e-9)
    server_events = [json.loads(line)["event"] for line in (tmp_path / "server.log").read_text().splitlines()]
    assert "update_accepted" not in server_events  # no plaintext update reached the server
    assert "\n10\n" in f"\n{result.stdout}"  # the tutorial's grep: va finished 10 secure rounds
