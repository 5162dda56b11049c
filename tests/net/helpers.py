"""Real server and client processes on loopback for the deployment tests."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.conftest import REPO, cli_env, fedloom_cmd

HEART_DIR = REPO.parent / "shared" / "data" / "heart_disease"
LOADER = REPO / "examples" / "heart_disease" / "heart_data.py"
HOSPITALS = ("cleveland", "hungarian", "switzerland", "va")

BASE_TOML = """
seed = 3
rounds = 4
[model]
name = "2nn"
kwargs = { in_features = 13, hidden = 100, num_classes = 2 }
[client]
lr = 0.05
epochs = 3
batch_size = 16
[algorithm]
name = "scaffold"
[sampling]
fraction = 1.0
min_clients = 4
[data]
num_clients = 4
[eval]
target_accuracy = 0.0
[deploy]
clients = ["cleveland", "hungarian", "switzerland", "va"]
deadline_s = 30.0
min_quorum = 4
max_message_bytes = 4096
heartbeat_s = 0.5
offline_after_s = 5.0
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A fedloom process with stdout/stderr in files."""

    def __init__(self, args: Sequence[str], cwd: Path, name: str) -> None:
        self.name = name
        self.out = cwd / f"{name}.out"
        self.err = cwd / f"{name}.err"
        with self.out.open("ab") as o, self.err.open("ab") as e:
            self.p = subprocess.Popen(fedloom_cmd(*args), cwd=cwd, env=cli_env(), stdout=o, stderr=e)

    def events(self, event: str | None = None) -> list[dict[str, Any]]:
        rows = []
        for line in self.err.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by SIGKILL
                if event is None or rec.get("event") == event:
                    rows.append(rec)
        return rows

    def wait_event(self, event: str, timeout: float = 60, **match: Any) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for rec in self.events(event):
                if all(rec.get(k) == v for k, v in match.items()):
                    return rec
            if self.p.poll() is not None and not self.events(event):
                break
            time.sleep(0.05)
        raise AssertionError(
            f"{self.name}: no {event} {match} within {timeout}s:\n{self.err.read_text()[-3000:]}"
        )

    def wait(self, timeout: float = 120) -> int:
        return self.p.wait(timeout=timeout)

    def kill(self) -> None:
        self.p.send_signal(signal.SIGKILL)
        self.p.wait(timeout=10)

    def stop(self) -> None:
        if self.p.poll() is None:
            self.kill()


def server(cwd: Path, config: Path, port: int, *extra: str, name: str = "server") -> Proc:
    return Proc(
        [
            "server",
            "--config",
            str(config),
            "--listen",
            f"127.0.0.1:{port}",
            "--state-dir",
            str(cwd / "srv"),
            "--eval-data",
            f"{LOADER}:all",
            "--data-dir",
            str(HEART_DIR),
            *extra,
        ],
        cwd,
        name,
    )


def client(cwd: Path, hospital: str, port: int, *extra: str, name: str | None = None) -> Proc:
    return Proc(
        [
            "client",
            "--server",
            f"127.0.0.1:{port}",
            "--data",
            f"{LOADER}:{hospital}",
            "--data-dir",
            str(HEART_DIR),
            "--state-dir",
            str(cwd / "cstate" / hospital),
            "--give-up-after",
            "60",
            *extra,
        ],
        cwd,
        name or hospital,
    )


def write_config(path: Path, extra: str = "", base: str = BASE_TOML) -> Path:
    """``base`` with ``extra`` TOML lines merged in (later keys of a section win via --set-like edit)."""
    path.write_text(base + extra, encoding="utf-8")
    return path
