"""Faults with real processes: bad updates, garbage bytes, dead clients, missing credentials."""

from __future__ import annotations

import io
import json
import os
import socket
import time
from pathlib import Path

import grpc
import pytest
import torch
import xxhash
from tests.conftest import run_cli
from tests.net.helpers import (
    HOSPITALS,
    LOADER,
    GatedWork,
    Proc,
    client,
    free_port,
    run_in_thread,
    server,
    write_config,
)

from fedloom.algorithms.api import Broadcast, ClientContext, ClientUpdate, ServerContext, Workspace
from fedloom.config.loader import load_config
from fedloom.core.params import Params
from fedloom.core.serde import slots_to_bytes
from fedloom.engine import ClientDropped, RoundCommitted, RunStopped, read_events
from fedloom.models.zoo import build_model
from fedloom.net.auth import Credentials, revoke
from fedloom.net.client import ClientOptions, NetClient, algorithm_work, make_channel, upload_chunks
from fedloom.net.datasources import load_client_data
from fedloom.net.logs import JsonLog
from fedloom.net.proto import fedloom_pb2 as pb
from fedloom.net.proto import fedloom_pb2_grpc as pbg
from fedloom.net.state import NetState
from fedloom.net.wire import decode_broadcast, encode_update
from fedloom.results.store import RunStore
from fedloom.sim.build import build_algorithm, build_pipeline

pytestmark = pytest.mark.slow


class _Mallory:
    """The test process playing client 'va' over the real protocol, able to send anything."""

    def __init__(self, port: int, heart_dir: Path) -> None:
        self.channel = make_channel(f"127.0.0.1:{port}", Credentials(), 4096)
        self.stub = pbg.CoordinatorStub(self.channel)
        self.md = (("fedloom-client", "va"), ("fedloom-token", ""))
        self.join = self.stub.Join(pb.JoinRequest(client_name="va"), metadata=self.md, timeout=30)
        cfg = load_config(Path(os.environ["FEDLOOM_TEST_CFG"]))
        data = load_client_data(f"{LOADER}:va", cfg, data_dir=heart_dir, partition_client=None)
        module = build_model(cfg.model.name, cfg.model.kwargs, seed=cfg.seed)
        self.seed = cfg.seed
        self.work = algorithm_work(build_algorithm(cfg), build_pipeline(cfg), Workspace(module), data)

    def task(self, round: int) -> tuple[pb.TaskReply, Broadcast]:
        end = time.monotonic() + 60
        while time.monotonic() < end:
            t = self.stub.GetTask(pb.TaskRequest(wait_s=2), metadata=self.md, timeout=30)
            self._answer_evaluation(t)
            if t.kind == pb.TRAIN and t.round == round:
                blob = b"".join(
                    c.data
                    for c in self.stub.Download(
                        pb.DownloadRequest(round=round, broadcast_digest=t.broadcast_digest), metadata=self.md
                    )
                )
                assert xxhash.xxh3_128_hexdigest(blob) == t.broadcast_digest  # the name of the model
                return t, decode_broadcast(blob, round)
        raise AssertionError(f"no task for round {round}")

    def _answer_evaluation(self, t: pb.TaskReply, md: tuple[tuple[str, str], ...] | None = None) -> None:
        """Answer an EVALUATE task as a site without a test split does (else the server waits out its deadline)."""
        if t.kind == pb.EVALUATE:
            report = pb.EvalReport(
                round=t.round, model_digest=t.broadcast_digest, unavailable="no test split"
            )
            assert self.stub.Evaluate(report, metadata=md or self.md, timeout=30).accepted

    def finish(self, *names: str) -> None:
        """Stay, as each of ``names`` (default 'va'), until the server says the run is done, answering
        its evaluation tasks; then hang up."""
        left = {name: (("fedloom-client", name), ("fedloom-token", "")) for name in names or ("va",)}
        end = time.monotonic() + 60
        while left and time.monotonic() < end:
            for name, md in list(left.items()):
                t = self.stub.GetTask(pb.TaskRequest(wait_s=0.2), metadata=md, timeout=30)
                self._answer_evaluation(t, md)
                if t.kind == pb.DONE:
                    del left[name]
        self.channel.close()

    def train(self, b: Broadcast) -> ClientUpdate:
        return self.work(
            b,
            None,
            ClientContext(seed=self.seed, round=b.round, client_id=self.join.client_id),
            ServerContext(seed=self.seed, round=b.round, population=4),
        )

    def send(
        self, round: int, digest: str, meta: str, blob: bytes, *, as_client: str = "va"
    ) -> pb.UploadReply:
        chunks = list(upload_chunks(round, digest, meta, blob, 1000))
        md = (("fedloom-client", as_client), ("fedloom-token", ""))
        reply: pb.UploadReply = self.stub.Upload(iter(chunks), metadata=md, timeout=30)
        return reply

    def push(self, round: int, digest: str, meta: str, blob: bytes, *, announced: int = -1) -> pb.UploadReply:
        """An update in one unary Push (what clients do when it fits one message)."""
        size = len(blob) if announced < 0 else announced
        header = pb.UpdateHeader(round=round, broadcast_digest=digest, total_bytes=size, meta_json=meta)
        reply: pb.UploadReply = self.stub.Push(
            pb.Chunk(header=header, data=blob), metadata=self.md, timeout=30
        )
        return reply

    def send_update(self, round: int, digest: str, u: ClientUpdate) -> pb.UploadReply:
        meta, blob = encode_update(u)
        return self.send(round, digest, meta, blob)


def _with_delta(u: ClientUpdate, delta: Params) -> ClientUpdate:
    return ClientUpdate(u.client_id, delta, u.weight, u.num_examples, u.num_steps, u.metrics)


def test_every_bad_update_is_rejected_and_the_round_goes_on(
    heart_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write_config(
        tmp_path / "exp.toml",
    )
    text = cfg.read_text().replace('name = "scaffold"', 'name = "fedavg"').replace("rounds = 4", "rounds = 2")
    cfg.write_text(text.replace("min_quorum = 4", "min_quorum = 4\nmax_update_norm = 50.0"))
    monkeypatch.setenv("FEDLOOM_TEST_CFG", str(cfg))
    port = free_port()
    srv = server(tmp_path, cfg, port)
    honest = [client(tmp_path, h, port) for h in HOSPITALS[:3]]
    try:
        srv.wait_event("listening")
        m = _Mallory(port, heart_dir)
        t, b = m.task(1)
        good = m.train(b)
        d = t.broadcast_digest
        delta = good.delta
        first = next(iter(delta))
        bad: dict[str, tuple[pb.UploadReply, str]] = {}
        bad["nan"] = (m.send_update(1, d, _with_delta(good, delta.map(lambda v: v * float("nan")))), "NaN")
        bad["shape"] = (
            m.send_update(1, d, _with_delta(good, Params({**delta, first: delta[first].reshape(-1)}))),
            "shape",
        )
        renamed = Params({("evil." + k if k == first else k): v for k, v in delta.items()})
        bad["names"] = (m.send_update(1, d, _with_delta(good, renamed)), "different parameter names")
        bad["dtype"] = (m.send_update(1, d, _with_delta(good, delta.map(lambda v: v.double()))), "dtype")
        bad["norm"] = (m.send_update(1, d, _with_delta(good, delta * 1e6)), "exceeds the bound")
        meta, blob = encode_update(good)
        garbage = bytes(
            torch.randint(0, 256, (len(blob),), generator=torch.Generator().manual_seed(1)).tolist()
        )
        bad["garbage"] = (m.send(1, d, meta, garbage), "does not parse")
        bad["header"] = (m.send(1, d, "{not json", blob), "not JSON")
        bad["oversized"] = (m.send(1, d, meta, blob * 40), "exceeds the limit")
        bad["future"] = (m.send(1 + 6, d, meta, blob), "not yet started")
        bad["digest"] = (m.send(1, "0" * 64, meta, blob), "another model")
        bad["no_slot"] = (m.send(1, d, meta, slots_to_bytes({"other": delta})), "'delta' slot")
        # The same checks guard the unary Push (small messages: this limit is 4096 bytes).
        headless = m.stub.Push(pb.Chunk(data=b"x" * 100), metadata=m.md, timeout=30)
        bad["push_no_header"] = (headless, "upload without a header")
        bad["push_garbage"] = (m.push(1, d, meta, garbage[:2000]), "does not parse")
        bad["push_size"] = (m.push(1, d, meta, garbage[:2000], announced=1000), "announced 1000 bytes")
        with pytest.raises(grpc.RpcError) as too_big:  # over gRPC's own limit: refused before our code
            m.push(1, d, meta, blob)
        assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The broadcast needs several chunks, so the TRAIN reply did not carry it (Download did).
        assert t.kind == pb.TRAIN
        assert t.broadcast == b""
        assert t.broadcast_bytes > 4096
        # Garbage on the socket: the server must shrug it off.
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(os.urandom(4096))
        for what, (reply, expected) in bad.items():
            assert not reply.accepted, what
            assert expected in reply.error, (what, reply.error)
        # The three honest updates are in; a second one from cleveland is a duplicate.
        end = time.monotonic() + 60
        while len([e for e in srv.events("update_accepted") if e["round"] == 1]) < 3:
            assert time.monotonic() < end
            time.sleep(0.05)
        dup = m.send(1, d, meta, blob, as_client="cleveland")
        assert not dup.accepted
        assert "duplicate submission" in dup.error
        assert m.send(1, d, meta, blob).accepted
        status = run_cli("status", "--server", f"127.0.0.1:{port}", cwd=tmp_path)
        assert "clients online" in status.stdout
        assert "rejected" in status.stdout
        t2, b2 = m.task(2)
        replay = m.send(1, d, meta, blob)
        assert not replay.accepted
        assert "replayed or stale" in replay.error, replay.error
        assert m.send_update(2, t2.broadcast_digest, m.train(b2)).accepted
        m.finish()
        assert srv.wait(120) == 0, srv.err.read_text()[-3000:]
        for c in honest:
            assert c.wait(30) == 0
    finally:
        for p in [srv, *honest]:
            p.stop()
    with NetState(tmp_path / "srv" / "state.sqlite") as net:
        accepted = sorted((a.round, a.client) for a in net.audit_rows("accepted"))
        assert accepted == sorted((r, h) for r in (1, 2) for h in HOSPITALS)
        rejected = net.audit_rows("rejected")
        assert len(rejected) == len(bad) + 2
        assert [r.client for r in rejected].count("cleveland") == 1
        committed = [json.loads(a.detail)["clients"] for a in net.audit_rows("round_committed")]
        assert committed == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert len(srv.events("update_rejected")) == len(bad) + 2


def _quick(tmp_path: Path, quorum: int, attempts: int = 3) -> Path:
    cfg = write_config(tmp_path / "exp.toml")
    text = cfg.read_text().replace('name = "scaffold"', 'name = "fedavg"').replace("rounds = 4", "rounds = 3")
    text = text.replace("deadline_s = 30.0", "deadline_s = 3.0").replace("epochs = 3", "epochs = 20")
    text = text.replace("min_quorum = 4", f"min_quorum = {quorum}\nmax_round_attempts = {attempts}")
    cfg.write_text(text)
    return cfg


def test_client_sigkills_round_completes_with_quorum_then_aborts_cleanly_below_it(
    heart_dir: Path, tmp_path: Path
) -> None:
    cfg = _quick(tmp_path, quorum=3, attempts=1)
    cfg.write_text(cfg.read_text().replace("rounds = 3", "rounds = 5"))
    port = free_port()
    srv = server(tmp_path, cfg, port)
    clients = {h: client(tmp_path, h, port) for h in HOSPITALS}
    try:
        srv.wait_event("round_committed", round=1)
        clients["switzerland"].kill()  # 3 left = quorum: rounds go on
        srv.wait_event("round_committed", round=3)
        clients["va"].kill()  # 2 left < quorum: the next round aborts, the server stops cleanly
        assert srv.wait(120) == 2
    finally:
        for p in [srv, *clients.values()]:
            p.stop()
    assert "below quorum" in srv.err.read_text()
    metrics = [json.loads(x) for x in (tmp_path / "srv" / "metrics.jsonl").read_text().splitlines()]
    done = [m["round"] for m in metrics]
    assert done[:3] == [1, 2, 3]
    assert done[-1] < 5
    assert metrics[0]["num_clients"] == 4
    with NetState(tmp_path / "srv" / "state.sqlite") as net:
        accepted = {(a.round, a.client) for a in net.audit_rows("accepted")}
        dropouts = {(a.round, a.client) for a in net.audit_rows("dropout")}
        aborted = net.audit_rows("round_aborted")
    for m in metrics[1:]:
        r = m["round"]
        got = {h for (rr, h) in accepted if rr == r}
        assert m["num_clients"] == len(got) >= 3  # every accepted update made it into its round
        if "switzerland" not in got:
            assert (r, "switzerland") in dropouts
    assert len(aborted) == 1
    assert aborted[0].round == done[-1] + 1
    with RunStore(tmp_path / "srv" / "state.sqlite") as store:
        assert store.get_meta("status") == "failed"
        assert store.latest_round() == done[-1]  # the last good checkpoint is intact
    # Every audited dropout is a client_dropped event of its round (the aborted one's included),
    # and the stream ends with the failed stop after the last committed round.
    events = list(read_events(tmp_path / "srv" / "events.jsonl"))
    assert {(e.round, e.client) for e in events if isinstance(e, ClientDropped)} == dropouts
    assert {"switzerland", "va"} <= {
        e.client for e in events if isinstance(e, ClientDropped) and e.round == done[-1] + 1
    }
    stop = events[-1]
    assert isinstance(stop, RunStopped)
    assert stop.failed
    assert "below quorum" in stop.reason
    assert stop.round == done[-1]
    assert [e.round for e in events if isinstance(e, RoundCommitted)] == done


def test_tls_and_tokens_refuse_unknown_revoked_and_uncredentialed_clients(
    heart_dir: Path, tmp_path: Path
) -> None:
    run_cli("certs", "--out", str(tmp_path / "certs"), "--clients", "a,b", cwd=tmp_path)
    revoke(tmp_path / "certs", "b")  # `fedloom certs --revoke b`, without another process start
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
    good = client(
        tmp_path, "cleveland", port, "--client-id", "a", "--tls-dir", str(certs / "clients" / "a"), name="a"
    )
    revoked = client(
        tmp_path, "va", port, "--client-id", "b", "--tls-dir", str(certs / "clients" / "b"), name="b"
    )
    wrong = client(
        tmp_path,
        "va",
        port,
        "--client-id",
        "a",
        "--tls-dir",
        str(certs / "clients" / "a"),
        "--token",
        "x",
        name="w",
    )
    stranger = client(
        tmp_path, "va", port, "--client-id", "mallory", "--tls-dir", str(certs / "clients" / "a"), name="m"
    )
    try:
        assert revoked.wait(60) == 3
        assert wrong.wait(60) == 3
        assert stranger.wait(60) == 3
        assert srv.wait(120) == 0, srv.err.read_text()[-3000:]
        assert good.wait(30) == 0
    finally:
        for p in [srv, good, revoked, wrong, stranger]:
            p.stop()
    reasons = [e["reason"] for e in srv.events("refused")]
    assert any("revoked" in r for r in reasons)
    assert any("wrong token" in r for r in reasons)
    assert any("mallory" in r for r in reasons)
    assert "revoked" in revoked.err.read_text()


def test_overselected_late_update_is_discarded_and_counted(heart_dir: Path, tmp_path: Path) -> None:
    """deploy.overselect: 4 asked for a cohort of 3; the round closes on 3, the 4th is late.

    'va' (in-process) holds its update until the round is committed, so which client is
    late is fixed, not a race.
    """
    cfg = write_config(tmp_path / "exp.toml")
    text = cfg.read_text().replace('name = "scaffold"', 'name = "fedavg"').replace("rounds = 4", "rounds = 1")
    text = text.replace("fraction = 1.0", "fraction = 0.75").replace("min_clients = 4", "min_clients = 3")
    cfg.write_text(text.replace("min_quorum = 4", "min_quorum = 3\noverselect = 1.34"))
    port = free_port()
    gated = GatedWork("va", heart_dir, hold_round=1)
    sink = io.StringIO()
    va = NetClient(
        ClientOptions(server=f"127.0.0.1:{port}", name="va", give_up_after_s=60),
        JsonLog("client:va", stream=sink),
        work=gated,
    )
    srv = server(tmp_path, cfg, port)
    va_thread, va_code = run_in_thread(va)
    others: list[Proc] = []
    try:
        end = time.monotonic() + 60
        while '"joined"' not in sink.getvalue():  # va is online before the quorum can open round 1
            assert time.monotonic() < end, sink.getvalue()[-2000:]
            time.sleep(0.05)
        others = [client(tmp_path, h, port) for h in HOSPITALS[:3]]
        opened = srv.wait_event("round_open", round=1)
        assert opened["target"] == 3
        assert sorted(opened["selected"]) == sorted(HOSPITALS)  # ceil(1.34 * 3) = 4 selected
        assert gated.holding.wait(120)
        srv.wait_event("round_committed", round=1)
        gated.release.set()  # the round closed on the other three: this update is late
        srv.wait_event("update_late", client="va", round=1)
        assert srv.wait(120) == 0, srv.err.read_text()[-3000:]
        va_thread.join(60)
        assert va_code == [0], sink.getvalue()[-2000:]
        for c in others:
            assert c.wait(30) == 0, c.err.read_text()[-2000:]
    finally:
        gated.release.set()
        for p in [srv, *others]:
            p.stop()
    rejected = [json.loads(x) for x in sink.getvalue().splitlines() if '"update_rejected"' in x]
    assert len(rejected) == 1
    assert "late update for round 1" in rejected[0]["reason"]
    metrics = [json.loads(x) for x in (tmp_path / "srv" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["round"], m["num_clients"], m["num_dropouts"]) for m in metrics] == [(1, 3, 1)]
    with NetState(tmp_path / "srv" / "state.sqlite") as net:
        assert sorted(a.client for a in net.audit_rows("accepted")) == sorted(HOSPITALS[:3])
        late = net.audit_rows("late")
        assert [(a.round, a.client) for a in late] == [(1, "va")]
        assert late[0].bytes > 0
        assert net.event_counts()["late"] == 1
        assert [json.loads(a.detail)["clients"] for a in net.audit_rows("round_committed")] == [[0, 1, 2]]
        assert [(a.round, a.client) for a in net.audit_rows("dropout")] == [(1, "va")]
