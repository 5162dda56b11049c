"""Real server and client processes on loopback for the deployment tests."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tests.conftest import REPO, cli_env, fedloom_cmd

from fedloom.algorithms.api import (
    Broadcast,
    ClientContext,
    ClientState,
    ClientUpdate,
    ServerContext,
    Workspace,
)
from fedloom.config.loader import load_config
from fedloom.config.schema import ExperimentConfig
from fedloom.core.errors import TrainingError
from fedloom.core.params import Params
from fedloom.data.federated import NaturalDataset
from fedloom.data.heart_disease import HOSPITALS, packaged_dir
from fedloom.models.zoo import build_model
from fedloom.net.datasources import load_client_data, load_eval_data
from fedloom.sim.build import Components, build_algorithm, build_pipeline
from fedloom.sim.executor import SequentialExecutor
from fedloom.sim.runner import RunResult, run_simulation

if TYPE_CHECKING:  # fedloom.net.client imports grpc, which conftest checks for before any test runs
    from fedloom.net.client import NetClient, Work

# The UCI Heart Disease files shipped inside fedloom (checksum-verified whenever read from here).
HEART_DIR = packaged_dir()
LOADER = REPO / "examples" / "heart_disease" / "heart_data.py"

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


def deployed_run(cwd: Path, cfg: Path) -> list[Proc]:
    """Run a server and one client process per hospital in ``cwd`` to the end; returns the clients."""
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
    return clients


def simulate_deployed(run: Path, heart_dir: Path, out: Path) -> RunResult:
    """The simulation of the deployed ``run``'s experiment (``run/exp.toml``) on the same hospitals'
    data, each with its own test split, as its client process evaluates on; one torch thread."""
    cfg = load_config(run / "exp.toml")
    parts = [
        load_client_data(f"{LOADER}:{h}", cfg, data_dir=heart_dir, partition_client=None) for h in HOSPITALS
    ]
    module = build_model(cfg.model.name, cfg.model.kwargs, seed=cfg.seed)
    comps = Components(
        algorithm=build_algorithm(cfg),
        pipeline=build_pipeline(cfg),
        train=NaturalDataset(parts),
        test=load_eval_data(f"{LOADER}:all", cfg, data_dir=heart_dir),
        workspace=Workspace(module),
        initial_params=Params.from_module(module),
        data_source="heart",
        client_names=tuple(HOSPITALS),
        client_test=NaturalDataset(
            [load_eval_data(f"{LOADER}:{h}", cfg, data_dir=heart_dir) for h in HOSPITALS]
        ),
    )
    executor = SequentialExecutor(comps.workspace, comps.train, comps.pipeline)
    with torch.random.fork_rng(devices=[]):
        return run_simulation(cfg, out, components=comps, executor=executor)


def write_config(path: Path, extra: str = "", base: str = BASE_TOML) -> Path:
    """``base`` with ``extra`` TOML lines merged in (later keys of a section win via --set-like edit)."""
    path.write_text(base + extra, encoding="utf-8")
    return path


def db_snapshot(state_db: Path) -> tuple[dict[int, list[int]], int]:
    """``(pending client ids by round, latest checkpointed round)`` read without writing the DB."""
    if not state_db.exists():
        return {}, -1
    con = sqlite3.connect(f"file:{state_db}?mode=ro", uri=True, timeout=30)
    try:
        pending: dict[int, list[int]] = {}
        with contextlib.suppress(sqlite3.OperationalError):  # tables not created yet
            for r, c in con.execute("SELECT round, client_id FROM pending_updates ORDER BY round, client_id"):
                pending.setdefault(int(r), []).append(int(c))
        latest = -1
        with contextlib.suppress(sqlite3.OperationalError):
            row = con.execute("SELECT MAX(round) FROM checkpoint_files").fetchone()
            latest = -1 if row is None or row[0] is None else int(row[0])
        return pending, latest
    finally:
        con.close()


class GatedWork:
    """A real client's local work (the simulation's) that holds its update of ``hold_round`` until released.

    Used in-process as a :class:`~fedloom.net.client.NetClient` ``work`` factory, it makes
    "mid-round" exact: the round cannot close (it waits for this client), so the test can
    kill the server with the other updates accepted and no checkpoint for the round.
    """

    def __init__(self, hospital: str, heart_dir: Path, hold_round: int) -> None:
        self.hospital, self.heart_dir, self.hold_round = hospital, heart_dir, hold_round
        self.holding = threading.Event()  # set once the held update is computed
        self.release = threading.Event()

    def __call__(self, cfg: ExperimentConfig) -> Work:
        from fedloom.net.client import algorithm_work

        data = load_client_data(
            f"{LOADER}:{self.hospital}", cfg, data_dir=self.heart_dir, partition_client=None
        )
        module = build_model(cfg.model.name, cfg.model.kwargs, seed=cfg.seed)
        inner = algorithm_work(build_algorithm(cfg), build_pipeline(cfg), Workspace(module), data)

        def work(
            b: Broadcast, cs: ClientState | None, cctx: ClientContext, sctx: ServerContext
        ) -> ClientUpdate:
            update = inner(b, cs, cctx, sctx)
            if b.round == self.hold_round and not self.release.is_set():
                self.holding.set()
                if not self.release.wait(timeout=180):
                    raise TrainingError("the test never released the held update")
            return update

        return work


def run_in_thread(c: NetClient) -> tuple[threading.Thread, list[int]]:
    """Serve ``c`` on a thread; the list receives its exit code."""
    code: list[int] = []
    t = threading.Thread(target=lambda: code.append(c.serve()), daemon=True)
    t.start()
    return t, code
