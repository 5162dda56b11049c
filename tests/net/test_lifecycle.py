"""A run's lifecycle with real processes: client state commits, lost updates, restarts, refusals."""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from tests.net.helpers import (
    HOSPITALS,
    GatedWork,
    Proc,
    client,
    db_snapshot,
    free_port,
    run_in_thread,
    server,
    write_config,
)

from fedloom.core.params import Params
from fedloom.core.serde import params_from_bytes
from fedloom.net.client import ClientOptions, NetClient
from fedloom.net.logs import JsonLog
from fedloom.net.state import NetState
from fedloom.privacy.accounting import FixedSizeSampling, epsilon
from fedloom.results.store import RunStore
from fedloom.sim.sampling import secret_sample

pytestmark = pytest.mark.slow


def _model(run: Path) -> Params:
    return params_from_bytes((run / "srv" / "model.safetensors").read_bytes())


def _gated_client(
    tmp_path: Path, port: int, gated: GatedWork, sink: io.StringIO, name: str = "va"
) -> NetClient:
    return NetClient(
        ClientOptions(
            server=f"127.0.0.1:{port}", name=name, state_dir=tmp_path / "cstate" / name, give_up_after_s=60
        ),
        JsonLog(f"client:{name}", stream=sink),
        work=gated,
    )


def _wait_joined(sink: io.StringIO, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while '"event": "joined"' not in sink.getvalue():
        assert time.monotonic() < end, sink.getvalue()[-2000:]
        time.sleep(0.05)


def test_a_late_scaffold_update_leaves_the_clients_control_variate_where_it_was(
    heart_dir: Path, tmp_path: Path
) -> None:
    """Round 1 closes at its deadline without 'va' (quorum 3); va's update then arrives late and is
    refused. Its control variate of round 1 must not become the state it trains round 2 from."""
    cfg = write_config(tmp_path / "exp.toml")
    text = cfg.read_text().replace("rounds = 4", "rounds = 2").replace("min_quorum = 4", "min_quorum = 3")
    cfg.write_text(text.replace("deadline_s = 30.0", "deadline_s = 8.0"))
    port = free_port()
    gated = GatedWork("va", heart_dir, hold_round=1)
    sink = io.StringIO()
    va = _gated_client(tmp_path, port, gated, sink)
    srv = server(tmp_path, cfg, port)
    va_thread, va_code = run_in_thread(va)
    procs: list[Proc] = []
    try:
        _wait_joined(sink)  # online before round 1 opens, so it is sure to get that round's task
        procs = [client(tmp_path, h, port) for h in HOSPITALS if h != "va"]
        assert gated.holding.wait(120), srv.err.read_text()[-3000:]
        srv.wait_event("round_committed", round=1, timeout=120)
        gated.release.set()
        assert srv.wait(180) == 0, srv.err.read_text()[-3000:]
        va_thread.join(60)
        assert va_code == [0], sink.getvalue()[-2000:]
    finally:
        gated.release.set()
        for p in [srv, *procs]:
            p.stop()
    log = [json.loads(x) for x in sink.getvalue().splitlines() if x.startswith("{")]
    assert [e["round"] for e in log if e["event"] == "update_rejected"] == [1]
    assert [e["round"] for e in log if e["event"] == "update_accepted"] == [2]
    saved = sorted(p.name for p in (tmp_path / "cstate" / "va").iterdir() if p.suffix == ".safetensors")
    assert saved == ["state-r000002.safetensors"]  # round 1's late state was never committed
    with NetState(tmp_path / "srv" / "state.sqlite") as net:
        assert [(a.round, a.client) for a in net.audit_rows("late")] == [(1, "va")]


def test_a_pending_update_lost_to_a_crash_is_asked_for_again_and_the_model_is_unchanged(
    reference_run: Path, heart_dir: Path, tmp_path: Path
) -> None:
    """SIGKILL the server inside round 2 with 3 of 4 updates accepted, then tear the blob file of
    'cleveland' (what an OS crash can leave). The restarted server drops that row, asks cleveland
    again, takes its re-upload, and ends with the uninterrupted run's model, bit for bit."""
    shutil.copy(reference_run / "exp.toml", tmp_path / "exp.toml")
    cfg = tmp_path / "exp.toml"
    db = tmp_path / "srv" / "state.sqlite"
    port = free_port()
    gated = GatedWork("va", heart_dir, hold_round=2)
    sink = io.StringIO()
    va = _gated_client(tmp_path, port, gated, sink)
    srv = server(tmp_path, cfg, port)
    procs = [client(tmp_path, h, port) for h in HOSPITALS if h != "va"]
    va_thread, va_code = run_in_thread(va)
    srv2: Proc | None = None
    try:
        assert gated.holding.wait(120), srv.err.read_text()[-3000:]
        end = time.monotonic() + 120
        while (snap := db_snapshot(db)) != ({2: [0, 1, 2]}, 1):
            assert snap[1] <= 1, snap
            assert time.monotonic() < end, snap
            time.sleep(0.05)
        srv.kill()
        con = sqlite3.connect(db)
        (file, size) = con.execute(
            "SELECT file, bytes FROM pending_updates WHERE round = 2 AND client_id = 0"
        ).fetchone()
        con.close()
        (tmp_path / "srv" / "pending" / str(file)).write_bytes(bytes(size))  # torn: right size, wrong bytes
        gated.release.set()
        srv2 = server(tmp_path, cfg, port, name="server2")
        assert srv2.wait(180) == 0, srv2.err.read_text()[-3000:]
        assert srv2.wait_event("pending_lost", round=2)["clients"] == ["cleveland"]
        assert srv2.wait_event("round_open", round=2)["restored"] == 2
        va_thread.join(60)
        assert va_code == [0], sink.getvalue()[-2000:]
        for c in procs:
            assert c.wait(60) == 0, c.err.read_text()[-2000:]
    finally:
        gated.release.set()
        for p in [srv, *procs] + ([srv2] if srv2 is not None else []):
            p.stop()
    assert _model(tmp_path).equal(_model(reference_run))
    with NetState(db) as net:
        assert [(a.round, a.client) for a in net.audit_rows("pending_lost")] == [(2, "cleveland")]
        accepted = [(a.round, a.client) for a in net.audit_rows("accepted")]
        assert accepted.count((2, "cleveland")) == 2  # before the crash, and the re-upload
        committed = [json.loads(a.detail)["clients"] for a in net.audit_rows("round_committed")]
        assert committed == [[0, 1, 2, 3]] * 4


def test_server_refuses_a_changed_config_naming_the_keys(reference_run: Path, tmp_path: Path) -> None:
    shutil.copytree(reference_run / "srv", tmp_path / "srv")
    text = (reference_run / "exp.toml").read_text()
    cfg = write_config(tmp_path / "exp.toml", base=text.replace("lr = 0.05", "lr = 0.1"))
    srv = server(tmp_path, cfg, free_port())
    try:
        assert srv.wait(60) == 2
    finally:
        srv.stop()
    said = " ".join(srv.err.read_text().split())
    assert "different configuration (differs in client.lr)" in said


def test_server_refuses_a_state_dir_whose_database_lost_its_run(reference_run: Path, tmp_path: Path) -> None:
    """checkpoints/ and metrics.jsonl of a run, and an empty database beside them (replaced, or copied
    without its -wal file): the server must refuse rather than start afresh over them."""
    shutil.copytree(reference_run / "srv", tmp_path / "srv")
    for p in (tmp_path / "srv").glob("state.sqlite*"):
        p.unlink()
    (tmp_path / "srv" / "state.sqlite").write_bytes(b"")
    kept = [
        "metrics.jsonl",
        "model.safetensors",
        *(f"checkpoints/{p.name}" for p in (tmp_path / "srv" / "checkpoints").iterdir()),
    ]
    before = {name: (tmp_path / "srv" / name).read_bytes() for name in kept}
    shutil.copy(reference_run / "exp.toml", tmp_path / "exp.toml")
    srv = server(tmp_path, tmp_path / "exp.toml", free_port())
    try:
        assert srv.wait(60) == 2, srv.err.read_text()[-2000:]
    finally:
        srv.stop()
    said = " ".join(srv.err.read_text().split())
    assert "holds run artefacts (checkpoints/, metrics.jsonl, model.safetensors)" in said
    assert {name: (tmp_path / "srv" / name).read_bytes() for name in kept} == before


_DP = """
[privacy]
mode = "central"
clip_norm = 1.0
noise_multiplier = 1.5
"""


def _dp_run(tmp_path: Path, overselect: float) -> tuple[Proc, list[dict[str, Any]]]:
    cfg = write_config(tmp_path / "exp.toml", _DP)
    text = cfg.read_text().replace('name = "scaffold"', 'name = "fedavg"').replace("rounds = 4", "rounds = 2")
    text = text.replace("fraction = 1.0\nmin_clients = 4", "fraction = 0.75\nmin_clients = 3")
    text = text.replace("min_quorum = 4", f"min_quorum = 3\noverselect = {overselect}")
    cfg.write_text(text)
    port = free_port()
    srv = server(tmp_path, cfg, port)
    clients = [client(tmp_path, h, port) for h in HOSPITALS]
    try:
        assert srv.wait(180) == 0, srv.err.read_text()[-3000:]
    finally:
        for p in [srv, *clients]:
            p.stop()
    rows = [json.loads(x) for x in (tmp_path / "srv" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    return srv, rows


def test_deployed_dp_draws_cohorts_from_a_server_secret_and_credits_amplification(
    heart_dir: Path, tmp_path: Path
) -> None:
    """Cohort 3 of 4, no over-selection: the cohorts are secret_sample(secret, round) of a secret
    kept in the state database and sent to no client, and the ledger credits the sampling."""
    srv, rows = _dp_run(tmp_path, overselect=1.0)
    with RunStore(tmp_path / "srv" / "state.sqlite") as store:
        secret = store.get_meta("cohort_secret")
    assert secret is not None
    assert len(bytes.fromhex(secret)) == 32
    for r in (1, 2):
        chosen = secret_sample(bytes.fromhex(secret), r, [0, 1, 2, 3], 3)
        assert srv.wait_event("round_open", round=r)["selected"] == [HOSPITALS[c] for c in chosen]
    for f in tmp_path.glob("*.err"):  # the clients' logs (and the server's) never show it
        assert secret not in f.read_text()
    assert [r["epsilon"] for r in rows] == [epsilon(1.5, FixedSizeSampling(3, 4), r, 1e-5) for r in (1, 2)]
    assert all(r["dp_amplification"] is True for r in rows)


def test_deployed_dp_with_overselection_accounts_without_amplification(
    heart_dir: Path, tmp_path: Path
) -> None:
    """Over-selection: the contributors are the first to answer, not a uniform sample, so each round
    composes at rate 1 (no amplification), and the metrics say so and why."""
    _, rows = _dp_run(tmp_path, overselect=1.34)
    assert [r["epsilon"] for r in rows] == [epsilon(1.5, FixedSizeSampling(3, 3), r, 1e-5) for r in (1, 2)]
    assert rows[0]["epsilon"] > epsilon(1.5, FixedSizeSampling(3, 4), 1, 1e-5)
    assert all(r["dp_amplification"] is False for r in rows)
    assert "deploy.overselect = 1.34" in rows[0]["dp_amplification_reason"]


def test_clients_outlive_a_quorum_failure_and_finish_the_run_with_the_restarted_server(
    heart_dir: Path, tmp_path: Path
) -> None:
    """Two of four clients SIGKILLed: round 2 aborts below quorum and the server stops. The two
    survivors are told the server stopped, not that the run is done, and keep reconnecting; the
    server restarted (and the two clients with it) resumes, and the survivors take part again."""
    cfg = write_config(tmp_path / "exp.toml")
    # Ten rounds: the restarted server runs long enough for the survivors' reconnection backoff
    # (at most about 23 s) to bring them back before it ends.
    text = (
        cfg.read_text().replace('name = "scaffold"', 'name = "fedavg"').replace("rounds = 4", "rounds = 10")
    )
    text = text.replace("deadline_s = 30.0", "deadline_s = 5.0")
    cfg.write_text(text.replace("min_quorum = 4", "min_quorum = 3\nmax_round_attempts = 1"))
    port = free_port()
    srv = server(tmp_path, cfg, port)
    # No site evaluation: its phase would wait a deadline for the killed clients, after which they
    # count as offline and the server waits for them (deploy.wait_for_clients_s) instead of aborting.
    procs = {h: client(tmp_path, h, port, "--eval-data", "none") for h in HOSPITALS}
    srv2: Proc | None = None
    restarted: list[Proc] = []
    try:
        srv.wait_event("round_committed", round=1)
        procs["switzerland"].kill()
        procs["va"].kill()
        assert srv.wait(120) == 2, srv.err.read_text()[-3000:]
        srv2 = server(tmp_path, cfg, port, name="server2")
        restarted = [client(tmp_path, h, port, name=f"{h}2") for h in ("switzerland", "va")]
        for h in ("cleveland", "hungarian"):
            assert "the server stopped" in procs[h].wait_event("server_says")["message"]
            assert procs[h].events("server_unreachable")  # it outlived the server
            assert procs[h].p.poll() is None, f"{h} exited:\n{procs[h].err.read_text()[-2000:]}"
            assert not procs[h].events("done")
        assert srv2.wait(180) == 0, srv2.err.read_text()[-3000:]
        for p in [procs["cleveland"], procs["hungarian"], *restarted]:
            assert p.wait(60) == 0, p.err.read_text()[-2000:]
    finally:
        for p in [srv, *procs.values(), *restarted] + ([srv2] if srv2 is not None else []):
            p.stop()
    rounds = [json.loads(x)["round"] for x in (tmp_path / "srv" / "metrics.jsonl").read_text().splitlines()]
    assert rounds == list(range(1, 11))
    with NetState(tmp_path / "srv" / "state.sqlite") as net:
        committed = {a.round: json.loads(a.detail)["clients"] for a in net.audit_rows("round_committed")}
        (aborted,) = [a.round for a in net.audit_rows("round_aborted")]
    assert 2 <= aborted < 10  # the round running when the kills landed, or the next one
    # the survivors (ids 0 and 1) contributed to rounds of the restarted server
    for cid in (0, 1):
        assert any(cid in committed[r] for r in range(aborted, 11)), committed


def test_select_online_leaves_a_dead_client_out_of_later_cohorts(heart_dir: Path, tmp_path: Path) -> None:
    """'va' SIGKILLed after round 1: once it counts as offline (offline_after_s = 5), cohorts are
    drawn among the three online clients, so no round waits its deadline for va; each round's
    cohort is recorded in the state database."""
    cfg = write_config(tmp_path / "exp.toml")
    text = cfg.read_text().replace('name = "scaffold"', 'name = "fedavg"').replace("rounds = 4", "rounds = 5")
    text = text.replace("deadline_s = 30.0", "deadline_s = 8.0")
    cfg.write_text(text.replace("min_quorum = 4", "min_quorum = 3\nselect_online = true"))
    port = free_port()
    srv = server(tmp_path, cfg, port)
    procs = {h: client(tmp_path, h, port) for h in HOSPITALS}
    try:
        srv.wait_event("round_committed", round=1)
        procs["va"].kill()
        assert srv.wait(180) == 0, srv.err.read_text()[-3000:]
    finally:
        for p in [srv, *procs.values()]:
            p.stop()
    opened = {e["round"]: e["selected"] for e in srv.events("round_open")}
    rows = {
        m["round"]: m for m in map(json.loads, (tmp_path / "srv" / "metrics.jsonl").read_text().splitlines())
    }
    # va is offline 5 s after the kill: by round 4 at the latest (rounds 2 and 3 may wait for it)
    for r in (4, 5):
        assert opened[r] == ["cleveland", "hungarian", "switzerland"]
        assert rows[r]["num_dropouts"] == 0
        assert rows[r]["seconds"] < 4.0  # closed once the three answered, not at the 8 s deadline
    with NetState(tmp_path / "srv" / "state.sqlite") as net:
        for r in range(1, 6):
            assert net.cohort(r) == [HOSPITALS.index(h) for h in opened[r]]
