"""Server + 4 client processes on loopback: a full run, equality with the simulation, kill -9 + resume."""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from tests.net.helpers import (
    BASE_TOML,
    HOSPITALS,
    GatedWork,
    Proc,
    client,
    db_snapshot,
    deployed_run,
    free_port,
    run_in_thread,
    server,
    simulate_deployed,
    write_config,
)

from fedloom.algorithms.api import Broadcast
from fedloom.core.params import Params
from fedloom.core.serde import params_from_bytes
from fedloom.engine import BytesMoved, ClientAccepted, RunStarted, comparable, read_events
from fedloom.net.client import ClientOptions, NetClient
from fedloom.net.logs import JsonLog
from fedloom.net.state import NetState
from fedloom.net.wire import encode_broadcast

pytestmark = pytest.mark.slow


def _model(run: Path) -> Params:
    return params_from_bytes((run / "srv" / "model.safetensors").read_bytes())


def test_deployed_run_completes_audits_and_matches_simulation(
    reference_run: Path, heart_dir: Path, tmp_path: Path
) -> None:
    metrics = [json.loads(x) for x in (reference_run / "srv" / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1, 2, 3, 4]
    assert all(m["num_clients"] == 4 for m in metrics)
    with NetState(reference_run / "srv" / "state.sqlite") as net:
        accepted = net.audit_rows("accepted")
        assert sorted((a.round, a.client) for a in accepted) == sorted(
            (r, h) for r in range(1, 5) for h in HOSPITALS
        )
        assert net.event_counts().get("rejected", 0) == 0
        assert net.pending(5) == []
        assert all(not net.pending(r) for r in range(1, 5))
    # The model is larger than deploy.max_message_bytes (4096), so it travelled in chunks.
    assert _model(reference_run).num_bytes() > 4096
    # SCAFFOLD's control variates stayed on the clients, on disk.
    assert list((reference_run / "cstate" / "va").glob("state-r*.safetensors"))

    sim = simulate_deployed(reference_run, heart_dir, tmp_path / "sim")
    assert sim.final_round == 4
    # Same algorithm code, same seeds, one torch thread on both sides: the same bits, not just close.
    deployed = _model(reference_run)
    assert list(sim.state.params) == list(deployed)
    for k in deployed:
        assert torch.equal(sim.state.params[k], deployed[k]), k
    assert sim.final_metrics["test_accuracy"] == metrics[-1]["test_accuracy"]
    # The sites' own evaluations of the deployed model equal the simulation's of its model.
    assert sim.final_metrics["sites"] == metrics[-1]["sites"]
    assert sim.final_metrics["site_accuracy"] == metrics[-1]["site_accuracy"]
    # The same round engine ran both: the same events in the same order, equal in every field but
    # timing and the runtime-specific ones (which runtime, bytes on the wire, the deployment's
    # attempt and dropout counts; see fedloom.engine.events).
    deployed_events = list(read_events(reference_run / "srv" / "events.jsonl"))
    sim_events = list(read_events(tmp_path / "sim" / "events.jsonl"))
    assert [comparable(e) for e in deployed_events] == [comparable(e) for e in sim_events]
    # started, 4 x (opened .. committed: 4 accepted, central + sites + 4 site evaluations), stopped
    assert len(deployed_events) == 2 + 4 * 15
    (started,) = [e for e in deployed_events if isinstance(e, RunStarted)]
    assert (started.runtime, started.info["clients"]) == ("deployment", list(HOSPITALS))
    # Bytes: each accepted update's upload as audited, and the model sent to each of the 4 clients.
    with NetState(reference_run / "srv" / "state.sqlite") as net:
        audited = {(a.round, a.client): a.bytes for a in net.audit_rows("accepted")}
    accepted = [e for e in deployed_events if isinstance(e, ClientAccepted)]
    assert {(e.round, e.client): e.bytes for e in accepted} == audited
    model_bytes = len(encode_broadcast(Broadcast(round=1, params=deployed)))
    for moved in (e for e in deployed_events if isinstance(e, BytesMoved)):
        assert moved.up == sum(e.bytes for e in accepted if e.round == moved.round) > 0
        assert moved.down >= 4 * model_bytes


def test_a_model_that_fits_one_message_travels_in_unary_calls_to_the_same_result(
    reference_run: Path, tmp_path: Path
) -> None:
    # The reference run streamed chunks (max_message_bytes = 4096); with 1 MiB both the broadcast and
    # every update fit one message, so the model comes with the task and updates go by Push. The
    # transport must not change a bit.
    cfg = write_config(
        tmp_path / "exp.toml",
        base=BASE_TOML.replace("max_message_bytes = 4096", "max_message_bytes = 1048576"),
    )
    for c in deployed_run(tmp_path, cfg):
        assert [e["transfer"] for e in c.events("update_accepted")] == ["unary"] * 4, c.name
    for h in HOSPITALS:
        lines = (reference_run / f"{h}.err").read_text(encoding="utf-8").splitlines()
        accepted = [json.loads(x) for x in lines if '"update_accepted"' in x]
        assert [e["transfer"] for e in accepted] == ["stream"] * 4, h
    assert _model(tmp_path).equal(_model(reference_run))


def test_server_sigkill_mid_round_resumes_to_the_same_model(
    reference_run: Path, heart_dir: Path, tmp_path: Path
) -> None:
    """SIGKILL the server inside round 2 -- exactly: 3 of 4 updates accepted, no checkpoint 2.

    'va' is an in-process client whose round-2 update is held back, so round 2 cannot
    close before the kill whatever the machine's load; the other three are real client
    processes. After the restart the three accepted updates come from the pending table
    (not re-sent), 'va' retrains round 2 from its on-disk SCAFFOLD state of round 1, and
    the final model equals the uninterrupted run's bit for bit.
    """
    shutil.copy(reference_run / "exp.toml", tmp_path / "exp.toml")
    cfg = tmp_path / "exp.toml"
    db = tmp_path / "srv" / "state.sqlite"
    port = free_port()
    others = [h for h in HOSPITALS if h != "va"]
    gated = GatedWork("va", heart_dir, hold_round=2)
    sink = io.StringIO()
    va = NetClient(
        ClientOptions(
            server=f"127.0.0.1:{port}", name="va", state_dir=tmp_path / "cstate" / "va", give_up_after_s=60
        ),
        JsonLog("client:va", stream=sink),
        work=gated,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `fedloom client` trains (the reference run)
    srv = server(tmp_path, cfg, port)
    procs = [client(tmp_path, h, port) for h in others]
    va_thread, va_code = run_in_thread(va)
    srv2: Proc | None = None
    try:
        assert gated.holding.wait(120), srv.err.read_text()[-3000:]
        end = time.monotonic() + 120
        while True:
            pending, latest = db_snapshot(db)
            if pending.get(2) == [0, 1, 2] and latest == 1:
                break
            assert latest <= 1, "round 2 committed although 'va' never answered"
            assert time.monotonic() < end, f"pending {pending}, latest checkpoint {latest}"
            time.sleep(0.05)
        srv.kill()  # mid-round 2: three updates accepted and durable, round 2 not committed
        with NetState(db) as net:
            before = [(a.round, a.client) for a in net.audit_rows("accepted")]
        assert sorted(before) == sorted([(1, h) for h in HOSPITALS] + [(2, h) for h in others])
        gated.release.set()  # va's upload now fails: the server is gone
        srv2 = server(tmp_path, cfg, port, name="server2")
        assert srv2.wait(180) == 0, srv2.err.read_text()[-3000:]
        assert srv2.wait_event("resume")["round"] == 1
        assert srv2.wait_event("round_open", round=2)["restored"] == 3
        va_thread.join(60)
        assert va_code == [0], sink.getvalue()[-2000:]
        for c in procs:
            assert c.wait(60) == 0, c.err.read_text()[-2000:]
            assert c.events("server_unreachable"), f"{c.name} never noticed the outage"
        assert "server_unreachable" in sink.getvalue()
    finally:
        gated.release.set()
        torch.set_num_threads(threads)
        for p in [srv, *procs] + ([srv2] if srv2 is not None else []):
            p.stop()
    assert _model(tmp_path).equal(_model(reference_run))
    with NetState(db) as net:
        committed = [json.loads(a.detail)["clients"] for a in net.audit_rows("round_committed")]
        assert committed == [[0, 1, 2, 3]] * 4
        # The updates accepted before the kill were used from the pending table, never asked
        # for again: each (round, client) is accepted exactly once, in the order of the kill.
        after = [(a.round, a.client) for a in net.audit_rows("accepted")]
        assert len(after) == len(set(after)) == 16
        assert after[: len(before)] == before
        assert after[len(before)] == (2, "va")
        assert all(not net.pending(r) for r in range(1, 5))
    assert not list((tmp_path / "srv" / "pending").iterdir())  # no blob file outlives the run


def test_server_sigkilled_while_a_commit_is_in_flight_resumes_to_the_same_model(
    reference_run: Path, heart_dir: Path, tmp_path: Path
) -> None:
    """SIGKILL the server with round 2's commit stalled and rounds 3 and 4 run meanwhile.

    The server commits a round on a thread of its own, started once the next round is open. Round
    2's checkpoint file is made a named pipe, so writing it blocks (as a stalled disk would): the
    server goes on through round 3 and opens round 4, whose updates it still takes, then waits
    for the commit. Killed there, the database holds checkpoint 1 and every update of rounds 2, 3
    and 4 as pending. The restarted server redoes the three rounds from their pending updates, asks
    no client for any of them again, and ends with the uninterrupted run's model, bit for bit.
    """
    shutil.copy(reference_run / "exp.toml", tmp_path / "exp.toml")
    cfg = tmp_path / "exp.toml"
    db = tmp_path / "srv" / "state.sqlite"
    fifo = tmp_path / "srv" / "checkpoints" / "ckpt-000002.bin"  # round 2's (checkpoint.keep = 3)
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)
    port = free_port()
    srv = server(tmp_path, cfg, port)
    procs = [client(tmp_path, h, port) for h in HOSPITALS]
    srv2: Proc | None = None
    try:
        end = time.monotonic() + 180
        while True:
            pending, latest = db_snapshot(db)
            if all(pending.get(r) == [0, 1, 2, 3] for r in (2, 3, 4)):
                break
            assert time.monotonic() < end, f"pending {pending}, latest checkpoint {latest}"
            time.sleep(0.05)
        time.sleep(0.3)
        pending, latest = db_snapshot(db)
        assert (latest, sorted(pending)) == (1, [2, 3, 4])  # round 2's commit never finished
        srv.kill()
        fifo.unlink()
        srv2 = server(tmp_path, cfg, port, name="server2")
        assert srv2.wait(180) == 0, srv2.err.read_text()[-3000:]
        assert srv2.wait_event("resume")["round"] == 1
        for r in (2, 3, 4):
            assert srv2.wait_event("round_open", round=r)["restored"] == 4
        for c in procs:
            assert c.wait(60) == 0, c.err.read_text()[-2000:]
    finally:
        for p in [srv, *procs] + ([srv2] if srv2 is not None else []):
            p.stop()
    assert _model(tmp_path).equal(_model(reference_run))
    with NetState(db) as net:
        committed = [json.loads(a.detail)["clients"] for a in net.audit_rows("round_committed")]
        assert committed == [[0, 1, 2, 3]] * 4
        after = [(a.round, a.client) for a in net.audit_rows("accepted")]
        assert len(after) == len(set(after)) == 16  # no update of rounds 2 to 4 was uploaded twice
        assert all(not net.pending(r) for r in range(1, 5))


def test_scaffold_client_sigkilled_and_restarted_resumes_from_its_control_variate(
    reference_run: Path, tmp_path: Path
) -> None:
    """SIGKILL a SCAFFOLD client after round 2 and start it again on the same state directory.

    Wherever the kill lands, the round waits for the client (min_quorum = 4) and the restarted
    process trains from the control variate saved on disk before that round, so the model is
    the uninterrupted run's bit for bit (a client that lost its variate would restart from zero
    and change every later update).
    """
    shutil.copy(reference_run / "exp.toml", tmp_path / "exp.toml")
    cfg = tmp_path / "exp.toml"
    port = free_port()
    srv = server(tmp_path, cfg, port)
    procs = {h: client(tmp_path, h, port) for h in HOSPITALS}
    va2: Proc | None = None
    try:
        srv.wait_event("round_committed", round=2)
        procs["va"].kill()
        saved = sorted((tmp_path / "cstate" / "va").glob("state-r*.safetensors"))
        assert saved, "va kept no control variate on disk"
        va2 = client(tmp_path, "va", port, name="va2")
        assert srv.wait(180) == 0, srv.err.read_text()[-3000:]
        assert va2.wait(60) == 0, va2.err.read_text()[-2000:]
        for h in HOSPITALS[:3]:
            assert procs[h].wait(60) == 0, procs[h].err.read_text()[-2000:]
    finally:
        for p in [srv, *procs.values()] + ([va2] if va2 is not None else []):
            p.stop()
    assert _model(tmp_path).equal(_model(reference_run))
    accepted = [e["round"] for e in va2.events("update_accepted")]
    assert accepted
    assert min(accepted) >= 3  # the new process trained only rounds after the kill
    with NetState(tmp_path / "srv" / "state.sqlite") as net:
        assert [json.loads(a.detail)["clients"] for a in net.audit_rows("round_committed")] == [
            [0, 1, 2, 3]
        ] * 4
