"""Fixtures for the deployment tests: heart-disease data, the net extra, one shared reference run."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.net.helpers import HEART_DIR, HOSPITALS, client, free_port, server, write_config

pytest.importorskip("grpc", reason="the deployment tests need the 'net' extra (grpcio)")


@pytest.fixture(scope="session")
def heart_dir() -> Path:
    if not all((HEART_DIR / f"processed.{h}.data").is_file() for h in HOSPITALS):
        pytest.skip(f"UCI Heart Disease processed files not found in {HEART_DIR}")
    return HEART_DIR


@pytest.fixture(scope="session")
def reference_run(heart_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted deployed run of the shared test experiment (server + 4 client processes)."""
    cwd = tmp_path_factory.mktemp("reference")
    cfg = write_config(cwd / "exp.toml")
    port = free_port()
    srv = server(cwd, cfg, port)
    clients = [client(cwd, h, port) for h in HOSPITALS]
    try:
        assert srv.wait(180) == 0, srv.err.read_text()[-3000:]
        for c in clients:
            assert c.wait(30) == 0, c.err.read_text()[-2000:]
    finally:
        for p in [srv, *clients]:
            p.stop()
    return cwd
