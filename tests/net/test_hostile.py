"""A malicious or broken client against a real server process, with real client processes, on loopback."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import grpc
import pytest
import torch
from tests.conftest import run_cli
from tests.net.helpers import HOSPITALS, client, free_port, server, write_config
from tests.net.test_faults import _Mallory, _with_delta

from fedloom.algorithms.api import ClientUpdate
from fedloom.config.loader import load_config
from fedloom.core.params import Params
from fedloom.core.serde import slots_to_bytes
from fedloom.engine import Aggregated, ClientAccepted, ClientRejected, read_events
from fedloom.models.zoo import build_model
from fedloom.net.auth import Credentials
from fedloom.net.client import make_channel
from fedloom.net.proto import fedloom_pb2 as pb
from fedloom.net.proto import fedloom_pb2_grpc as pbg
from fedloom.net.refusals import REFUSED
from fedloom.net.state import NetState
from fedloom.net.wire import encode_update
from fedloom.results.store import RunStore

pytestmark = pytest.mark.slow


def _metrics(state_dir: Path) -> list[dict[str, float]]:
    return [json.loads(x) for x in (state_dir / "metrics.jsonl").read_text().splitlines()]


def test_hostile_uploads_are_clean_rejections_and_the_round_goes_on(
    heart_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Headers that break the JSON parser (5000 digits, 50000 levels, a number beyond a float), a
    weight over deploy.max_weight, a finite update of 3e38 (default: no norm bound), and a failure
    report after an accepted update: each is refused with a reason and audited, no staged slot is
    left behind, and round 1 completes with all four clients and a finite test loss."""
    cfg = write_config(tmp_path / "exp.toml")
    text = cfg.read_text().replace('name = "scaffold"', 'name = "fedavg"').replace("rounds = 4", "rounds = 1")
    cfg.write_text(
        text.replace("max_message_bytes = 4096", "max_message_bytes = 1048576\nmax_weight = 10000.0")
    )
    monkeypatch.setenv("FEDLOOM_TEST_CFG", str(cfg))
    port = free_port()
    srv = server(tmp_path, cfg, port)
    honest = [client(tmp_path, h, port) for h in HOSPITALS[:2]]
    try:
        srv.wait_event("listening")
        m = _Mallory(port, heart_dir)  # 'va', and below also 'switzerland' (no tokens in this run)
        m.channel.close()
        m.channel = make_channel(f"127.0.0.1:{port}", Credentials(), 1 << 20)  # the run's message size
        m.stub = pbg.CoordinatorStub(m.channel)
        swiss = (("fedloom-client", "switzerland"), ("fedloom-token", ""))
        m.stub.Join(pb.JoinRequest(client_name="switzerland"), metadata=swiss, timeout=30)
        t, b = m.task(1)
        d = t.broadcast_digest
        good = m.train(b)
        meta, blob = encode_update(good)
        base = '{"num_examples": 10, "num_steps": 1, '
        headers = {
            "digits": (base + '"weight": ' + "9" * 5000 + "}", "does not parse"),
            "nested": (base + '"weight": 1, "m": ' + "[" * 50000 + "]" * 50000 + "}", "does not parse"),
            "beyond_float": (
                base + '"weight": 1, "metrics": {"loss": 1' + "0" * 400 + "}}",
                "finite numbers",
            ),
        }
        for what, (header, expected) in headers.items():
            for _ in range(20):
                reply = m.send(1, d, header, blob)
                assert not reply.accepted, what
                assert expected in reply.error, (what, reply.error[:300])
        staged = sorted(os.listdir(tmp_path / "srv" / "pending"))
        assert len(staged) <= 3, staged  # the two honest updates and one slot reused 60 times
        heavy = m.send(1, d, meta.replace(f'"weight": {good.weight}', '"weight": 1e300'), blob)
        assert "exceeds deploy.max_weight = 10000" in heavy.error
        big = good.delta.map(lambda v: v.clone())
        next(iter(big.values())).view(-1)[0] = 3e38
        overflow = m.send_update(1, d, _with_delta(good, big))
        assert "squared L2 norm overflows float32" in overflow.error
        assert m.send(1, d, meta, blob).accepted
        report = pb.UpdateHeader(round=1, broadcast_digest=d, failure="error: diverged")
        twice = m.stub.Push(pb.Chunk(header=report), metadata=m.md, timeout=30)
        assert not twice.accepted
        assert "already sent an accepted update" in twice.error
        # The round still waits for switzerland: its update counts, it is not turned away as late.
        assert m.send(1, d, meta, blob, as_client="switzerland").accepted
        m.finish("va", "switzerland")
        assert srv.wait(120) == 0, srv.err.read_text()[-3000:]
        for c in honest:
            assert c.wait(30) == 0, c.err.read_text()[-2000:]
    finally:
        for p in [srv, *honest]:
            p.stop()
    (r1,) = _metrics(tmp_path / "srv")
    assert (r1["num_clients"], r1["num_failed"]) == (4, 0)
    assert math.isfinite(r1["test_loss"])
    with NetState(tmp_path / "srv" / "state.sqlite") as net:
        assert sorted(a.client for a in net.audit_rows("accepted")) == sorted(HOSPITALS)
        rejected = net.audit_rows("rejected")
        assert len(rejected) == 60 + 3
        assert all(len(r.detail) <= 600 for r in rejected)
        assert net.audit_rows("failed") == []
        assert net.audit_rows("late") == []


def test_refusals_are_uniform_truncated_and_rate_limited(heart_dir: Path, tmp_path: Path) -> None:
    """300 calls with 2 KB names or a real name and a wrong token: one answer for all, at most a
    burst of records with names cut short, the rest counted; a valid client then trains as usual."""
    run_cli("certs", "--out", str(tmp_path / "certs"), "--clients", "a,b", cwd=tmp_path)
    cfg = write_config(tmp_path / "exp.toml")
    text = cfg.read_text().replace(
        'clients = ["cleveland", "hungarian", "switzerland", "va"]', 'clients = ["a", "b"]'
    )
    text = text.replace("min_clients = 4", "min_clients = 2").replace("num_clients = 4", "num_clients = 2")
    text = text.replace("min_quorum = 4", "min_quorum = 1").replace("deadline_s = 30.0", "deadline_s = 2.0")
    cfg.write_text(text.replace("rounds = 4", "rounds = 1").replace('name = "scaffold"', 'name = "fedavg"'))
    port = free_port()
    certs = tmp_path / "certs"
    srv = server(tmp_path, cfg, port, "--tls-dir", str(certs))
    good = None
    try:
        srv.wait_event("listening")
        bundle = certs / "clients" / "a"
        channel = make_channel(
            f"127.0.0.1:{port}",
            Credentials(ca=bundle / "ca.pem", cert=bundle / "cert.pem", key=bundle / "key.pem"),
            4096,
        )
        stub = pbg.CoordinatorStub(channel)
        answers: dict[str, set[str]] = {"unknown": set(), "wrong_token": set()}
        start = time.monotonic()
        for i in range(300):
            kind = "unknown" if i % 2 else "wrong_token"
            name = f"{i:04d}" + "m" * 2044 if kind == "unknown" else "a"
            with pytest.raises(grpc.RpcError) as err:
                stub.Heartbeat(
                    pb.HeartbeatRequest(),
                    metadata=(("fedloom-client", name), ("fedloom-token", "x")),
                    timeout=30,
                )
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            answers[kind].add(str(err.value.details()))
        flood_s = time.monotonic() - start
        assert answers == {"unknown": {REFUSED}, "wrong_token": {REFUSED}}
        time.sleep(3.5)  # the bucket refills one record every 3 s
        with pytest.raises(grpc.RpcError):
            stub.Heartbeat(pb.HeartbeatRequest(), metadata=(("fedloom-client", "z" * 2048),), timeout=30)
        channel.close()
        status = run_cli(
            "status", "--server", f"127.0.0.1:{port}", "--tls-dir", str(certs), "--json", cwd=tmp_path
        )
        assert json.loads(status.stdout)["refused"]["total"] == 301
        good = client(tmp_path, "cleveland", port, "--client-id", "a", "--tls-dir", str(bundle), name="a")
        assert srv.wait(120) == 0, srv.err.read_text()[-3000:]
        assert good.wait(30) == 0
    finally:
        for p in [srv, *([good] if good is not None else [])]:
            p.stop()
    with NetState(tmp_path / "srv" / "state.sqlite") as net:
        refused = net.audit_rows("refused")
    most = 20 + math.ceil(flood_s / 3) + 2
    assert 21 <= len(refused) <= most, len(refused)
    assert all(len(r.client) <= 80 for r in refused)
    assert "refused calls not recorded before this one" in refused[-1].detail
    assert len(srv.events("refused")) == len(refused)
    log_bytes = (tmp_path / "srv" / "server.log.jsonl").stat().st_size
    assert log_bytes < 100_000, log_bytes  # 300 refusals of 2 KB names each would be 600 KB alone


def test_a_restored_bad_update_is_rejected_and_rollback_resumes_from_a_kept_checkpoint(
    heart_dir: Path, tmp_path: Path
) -> None:
    """A SCAFFOLD update without its control delta sits in the pending table for round 1 when the
    server starts: it is rejected and dropped (the server used to die on it at every start), 'va' is
    asked again, the run completes. `fedloom rollback` then makes round 1 the latest, and the server
    started again redoes round 2 from it."""
    cfg = write_config(tmp_path / "exp.toml")
    cfg.write_text(cfg.read_text().replace("rounds = 4", "rounds = 2"))
    exp = load_config(cfg)
    zeros = Params.from_module(build_model(exp.model.name, exp.model.kwargs, seed=exp.seed)).zeros_like()
    meta = encode_update(ClientUpdate(3, zeros, 1.0, 10, 5))[0]
    (tmp_path / "srv").mkdir()
    with NetState(tmp_path / "srv" / "state.sqlite") as net:
        net.add_pending(1, 3, "va", meta, slots_to_bytes({"delta": zeros}), "attempt 1")

    def run(name: str) -> None:
        port = free_port()
        srv = server(tmp_path, cfg, port, name=name)
        clients = [client(tmp_path, h, port, name=f"{h}-{name}") for h in HOSPITALS]
        try:
            assert srv.wait(180) == 0, srv.err.read_text()[-3000:]
            for c in clients:
                assert c.wait(30) == 0, c.err.read_text()[-2000:]
        finally:
            for p in [srv, *clients]:
                p.stop()

    run("first")
    with NetState(tmp_path / "srv" / "state.sqlite") as net:
        (rejected,) = net.audit_rows("rejected")
        assert (rejected.round, rejected.client) == (1, "va")
        assert "restored update" in rejected.detail
        assert "missing ['control_delta']" in rejected.detail
        # the injected row's own 'accepted' line, then va's update, asked for again
        accepted = sorted(a.client for a in net.audit_rows("accepted") if a.round == 1)
        assert accepted == sorted([*HOSPITALS, "va"])
        committed = [json.loads(a.detail)["clients"] for a in net.audit_rows("round_committed")]
        assert committed == [[0, 1, 2, 3], [0, 1, 2, 3]]
    first = _metrics(tmp_path / "srv")
    assert [m["round"] for m in first] == [1, 2]
    refused = run_cli("rollback", str(tmp_path / "srv"), "--round", "7", cwd=tmp_path, check=False)
    assert refused.returncode != 0
    assert "kept rounds: [0, 1, 2]" in refused.stdout + refused.stderr
    run_cli("rollback", str(tmp_path / "srv"), "--round", "1", cwd=tmp_path)
    with RunStore(tmp_path / "srv" / "state.sqlite") as store:
        assert store.latest_round() == 1
    assert [m["round"] for m in _metrics(tmp_path / "srv")] == [1]
    run("second")
    resumed = [json.loads(x) for x in (tmp_path / "second.err").read_text().splitlines() if '"resume"' in x]
    assert [r["round"] for r in resumed] == [1]
    again = _metrics(tmp_path / "srv")
    assert [m["round"] for m in again] == [1, 2]
    assert again[0] == first[0]
    # Clients train deterministically from (seed, round, client) and their state before round 2.
    assert again[1]["test_loss"] == pytest.approx(first[1]["test_loss"], rel=1e-6)
    with RunStore(tmp_path / "srv" / "state.sqlite") as store:
        assert store.latest_round() == 2
    assert torch.isfinite(torch.tensor(again[1]["test_loss"]))


def test_an_update_that_makes_the_aggregate_overflow_is_left_out_and_the_round_goes_on(
    heart_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FedNova weighs an update by p_i * tau_eff / tau_i: reporting one local step (tau_eff is tens of
    steps) multiplies 'va''s delta about tenfold. One element of 1e19 passes the per-update check
    (its square, 1e38, is a float32) but the new model's does not: the server leaves 'va' out, round 1
    is the three honest updates, and round 2 goes on normally."""
    cfg = write_config(tmp_path / "exp.toml")
    text = (
        cfg.read_text().replace('name = "scaffold"', 'name = "fednova"').replace("rounds = 4", "rounds = 2")
    )
    cfg.write_text(text.replace("min_quorum = 4", "min_quorum = 3"))
    monkeypatch.setenv("FEDLOOM_TEST_CFG", str(cfg))
    port = free_port()
    srv = server(tmp_path, cfg, port)
    honest = [client(tmp_path, h, port) for h in HOSPITALS[:3]]
    try:
        srv.wait_event("listening")
        m = _Mallory(port, heart_dir)
        t, b = m.task(1)
        good = m.train(b)
        big = good.delta.map(lambda v: v.clone())
        next(iter(big.values())).view(-1)[0] = 1e19
        poisoned = ClientUpdate(good.client_id, big, 300.0, good.num_examples, 1, good.metrics)
        assert m.send_update(1, t.broadcast_digest, poisoned).accepted  # alone it is a valid update
        t2, b2 = m.task(2)  # asked for round 2 as usual
        assert m.send_update(2, t2.broadcast_digest, m.train(b2)).accepted
        m.finish()
        assert srv.wait(120) == 0, srv.err.read_text()[-3000:]
        for c in honest:
            assert c.wait(30) == 0, c.err.read_text()[-2000:]
    finally:
        for p in [srv, *honest]:
            p.stop()
    r1, r2 = _metrics(tmp_path / "srv")
    assert (r1["num_clients"], r2["num_clients"]) == (3, 4)
    assert math.isfinite(r1["test_loss"])
    assert math.isfinite(r2["test_loss"])
    with NetState(tmp_path / "srv" / "state.sqlite") as net:
        (rejected,) = net.audit_rows("rejected")
        assert (rejected.round, rejected.client) == (1, "va")
        assert "left out" in rejected.detail
        assert "overflows float32" in rejected.detail
        committed = [json.loads(a.detail)["clients"] for a in net.audit_rows("round_committed")]
        assert committed == [[0, 1, 2], [0, 1, 2, 3]]
    with RunStore(tmp_path / "srv" / "state.sqlite") as store:
        assert store.load_state(1).params.l2_norm() < 1e3
    # The event stream says the same: round 1 accepted three, rejected 'va' with the guard's reason.
    events = list(read_events(tmp_path / "srv" / "events.jsonl"))
    one = [e for e in events if e.round == 1]
    assert sorted(e.client for e in one if isinstance(e, ClientAccepted)) == [
        "cleveland",
        "hungarian",
        "switzerland",
    ]
    (refused,) = [e for e in events if isinstance(e, ClientRejected)]
    assert (refused.round, refused.client, refused.reason) == (1, "va", rejected.detail)
    assert [e.clients for e in events if isinstance(e, Aggregated)] == [3, 4]


def test_an_attempt_without_a_usable_model_is_aborted_and_every_client_asked_again(
    heart_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two such FedNova updates ('va' and 'switzerland'): leaving either out still overflows, so no
    update is to blame alone. The attempt is aborted, its four updates are dropped (with their pending
    rows), and attempt 2 asks all four again: the honest processes train again, the attacker sends
    honest updates this time, and round 1 is made of attempt 2's four updates."""
    cfg = write_config(tmp_path / "exp.toml")
    text = (
        cfg.read_text().replace('name = "scaffold"', 'name = "fednova"').replace("rounds = 4", "rounds = 1")
    )
    cfg.write_text(text.replace("min_quorum = 4", "min_quorum = 2"))
    monkeypatch.setenv("FEDLOOM_TEST_CFG", str(cfg))
    port = free_port()
    srv = server(tmp_path, cfg, port)
    honest = [client(tmp_path, h, port) for h in HOSPITALS[:2]]
    try:
        srv.wait_event("listening")
        m = _Mallory(port, heart_dir)
        m.stub.Join(
            pb.JoinRequest(client_name="switzerland"),
            metadata=(("fedloom-client", "switzerland"), ("fedloom-token", "")),
            timeout=30,
        )
        t, b = m.task(1)
        good = m.train(b)
        big = good.delta.map(lambda v: v.clone())
        next(iter(big.values())).view(-1)[0] = 1e19
        meta, blob = encode_update(
            ClientUpdate(good.client_id, big, 300.0, good.num_examples, 1, good.metrics)
        )
        for name in ("va", "switzerland"):
            assert m.send(1, t.broadcast_digest, meta, blob, as_client=name).accepted
        again, _ = m.task(1)  # attempt 2 of round 1 asks 'va' again
        meta, blob = encode_update(good)
        for name in ("va", "switzerland"):
            assert m.send(1, again.broadcast_digest, meta, blob, as_client=name).accepted
        m.finish("va", "switzerland")
        assert srv.wait(120) == 0, srv.err.read_text()[-3000:]
        for c in honest:
            assert c.wait(30) == 0, c.err.read_text()[-2000:]
    finally:
        for p in [srv, *honest]:
            p.stop()
    (r1,) = _metrics(tmp_path / "srv")
    assert (r1["attempt"], r1["num_clients"]) == (2, 4)
    assert math.isfinite(r1["test_loss"])
    with NetState(tmp_path / "srv" / "state.sqlite") as net:
        rejected = net.audit_rows("rejected")
        assert sorted(r.client for r in rejected) == sorted(HOSPITALS)
        assert all("dropped with its attempt" in r.detail for r in rejected)
        (aborted,) = net.audit_rows("round_aborted")
        assert "attempt 1: no usable model" in aborted.detail
        assert sorted(a.client for a in net.audit_rows("accepted")) == sorted([*HOSPITALS, *HOSPITALS])
