"""Fixtures for the deployment tests: heart-disease data, the net extra, one shared reference run."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.net.helpers import HEART_DIR, HOSPITALS, deployed_run, write_config

from fedloom.data.heart_disease import read_table

pytest.importorskip("grpc", reason="the deployment tests need the 'net' extra (grpcio)")


@pytest.fixture(scope="session")
def heart_dir() -> Path:
    """The heart-disease files shipped with fedloom, each read (and so checksum-verified) once."""
    for h in HOSPITALS:
        read_table(h, HEART_DIR)
    return HEART_DIR


@pytest.fixture(scope="session")
def reference_run(heart_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted deployed run of the shared test experiment (server + 4 client processes)."""
    cwd = tmp_path_factory.mktemp("reference")
    deployed_run(cwd, write_config(cwd / "exp.toml"))
    return cwd
