"""Shared fixtures: where MNIST comes from in tests, and how to run the CLI as a real process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedloom.core.errors import DataError

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"


@pytest.fixture(scope="session")
def mnist_dir() -> str:
    """A value for ``data.dir``: the shared MNIST copy if present, else "" (automatic search).

    Skips when MNIST can be found nowhere without network access.
    """
    if (SHARED_MNIST / "train-images-idx3-ubyte.gz").is_file():
        return str(SHARED_MNIST)
    from fedloom.data.mnist import load_mnist

    try:
        load_mnist(None, download=False)
    except DataError as exc:
        pytest.skip(f"MNIST is not available offline: {exc}")
    return ""


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["MPLBACKEND"] = "Agg"
    return env


def fedloom_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedloom", *args]


def run_cli(
    *args: str, cwd: Path, check: bool = True, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        fedloom_cmd(*args), cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"fedloom {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc
