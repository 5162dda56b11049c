"""Fast checks of the deployment's pure parts: wire encoding, chunking, client state, tokens."""

from __future__ import annotations

import hashlib
import io
import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash
from tests.conftest import cli_env

from fedloom.algorithms.api import Broadcast, ClientState, ClientUpdate, ServerContext
from fedloom.config.schema import ExperimentConfig
from fedloom.core.errors import UpdateError
from fedloom.core.params import Params
from fedloom.net.auth import AuthError, TokenBook, generate_credentials, is_loopback, revoke
from fedloom.net.client import ClientStateStore
from fedloom.net.coordinator import Coordinator
from fedloom.net.logs import JsonLog
from fedloom.net.proto import fedloom_pb2 as pb
from fedloom.net.state import NetState
from fedloom.net.timing import RoundTiming
from fedloom.net.wire import (
    UpdateMeta,
    chunk_size_for,
    decode_broadcast,
    decode_chunk,
    decode_update,
    encode_broadcast,
    encode_bytes_field,
    encode_chunk,
    encode_update,
    iter_chunks,
    pieces_size,
    split_bytes_field,
    update_pieces,
)
from fedloom.sim.build import build_pipeline


def _p(seed: int) -> Params:
    g = torch.Generator().manual_seed(seed)
    return Params({"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g)})


def test_update_round_trip_is_bit_exact() -> None:
    u = ClientUpdate(2, _p(0), 5.0, 5, 3, {"train_loss": 0.5}, extras={"dc": _p(1)})
    meta, blob = encode_update(u, compute_s=0.25)
    back, compute = decode_update(2, meta, blob)
    assert back.delta.equal(u.delta)
    assert back.extras["dc"].equal(u.extras["dc"])
    assert (back.weight, back.num_examples, back.num_steps, compute) == (5.0, 5, 3, 0.25)
    assert list(back.delta) == ["w", "b"]


def test_broadcast_round_trip_and_chunks() -> None:
    b = Broadcast(7, _p(0), {"c": _p(2)})
    blob = encode_broadcast(b)
    pieces = list(iter_chunks(blob, 50))
    assert all(len(p) <= 50 for p in pieces)
    assert b"".join(pieces) == blob
    back = decode_broadcast(b"".join(pieces), 7)
    assert back.params.equal(b.params)
    assert back.extras["c"].equal(b.extras["c"])
    assert chunk_size_for(4096) == 2048
    assert chunk_size_for(1 << 30) == 1 << 20


def test_hand_encoded_messages_are_protobufs_own_encoding() -> None:
    blob = bytes(range(256)) * 700  # longer than one varint byte can count
    full = pb.TaskReply(
        kind=pb.TRAIN,
        round=3,
        broadcast_digest="ab" * 32,
        broadcast_bytes=len(blob),
        broadcast_xxh3=0xFFFFFFFFFFFFFFFF,
        deadline_in_s=12.5,
        secagg_json="{}",
        broadcast=blob,
    )
    small = pb.TaskReply()
    small.CopyFrom(full)
    small.ClearField("broadcast")
    number = pb.TaskReply.DESCRIPTOR.fields_by_name["broadcast"].number
    raw = small.SerializeToString() + encode_bytes_field(number, blob)
    assert raw == full.SerializeToString()  # field 9 is the last field protobuf writes
    assert pb.TaskReply.FromString(raw) == full
    rest, got = split_bytes_field(raw, number)
    assert got == blob
    assert pb.TaskReply.FromString(rest) == small
    assert split_bytes_field(small.SerializeToString(), number) == (small.SerializeToString(), None)
    # Fields in another order, and a truncated message.
    rest, got = split_bytes_field(encode_bytes_field(number, b"x") + small.SerializeToString(), number)
    assert got == b"x"
    assert pb.TaskReply.FromString(rest) == small
    with pytest.raises(UpdateError, match="overruns"):
        split_bytes_field(raw[:-1], number)
    header = pb.UpdateHeader(round=2, broadcast_digest="cd" * 32, total_bytes=len(blob), meta_json="{}")
    chunk = encode_chunk(blob, header)
    assert chunk == pb.Chunk(header=header, data=blob).SerializeToString()
    assert decode_chunk(chunk) == (header, blob)
    # An update's blob in pieces (views of its tensors) is joined with the envelope in one go.
    u = ClientUpdate(0, _p(0), 1.0, 1, 1)
    _, pieces = update_pieces(u)
    joined = encode_update(u)[1]
    assert pieces_size(pieces) == len(joined)
    assert encode_chunk(pieces, header) == pb.Chunk(header=header, data=joined).SerializeToString()


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("[]", "JSON object"),
        ('{"weight": -1, "num_examples": 1, "num_steps": 1}', "weight"),
        ('{"weight": 1, "num_examples": "x", "num_steps": 1}', "num_examples"),
        ('{"weight": 1, "num_examples": 1, "num_steps": 1, "metrics": {"a": "b"}}', "metrics"),
    ],
)
def test_bad_update_headers_are_named(header: str, expected: str) -> None:
    with pytest.raises(UpdateError, match=expected):
        UpdateMeta.from_json(header)


def test_garbage_blob_is_an_update_error() -> None:
    meta, _ = encode_update(ClientUpdate(0, _p(0), 1.0, 1, 1))
    with pytest.raises(UpdateError, match="does not parse"):
        decode_update(0, meta, b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")


def test_client_state_store_trains_round_r_from_state_before_r(tmp_path: Path) -> None:
    s = ClientStateStore(tmp_path, "run1", keep=2)
    assert s.load(before=1) is None
    s.save(1, ClientState({"c": _p(1)}))
    s.save(2, ClientState({"c": _p(2)}))
    again = s.load(before=2)  # a retried round 2 (server restart) starts from round 1's state
    assert again is not None
    assert again.values["c"].equal(_p(1))
    s.save(3, ClientState({"c": _p(3)}))
    assert len(list(tmp_path.glob("state-r*.safetensors"))) == 2
    fresh = ClientStateStore(tmp_path, "run2")  # another run's state never leaks in
    assert fresh.load(before=10) is None


def test_credentials_tokens_and_revocation(tmp_path: Path) -> None:
    generate_credentials(tmp_path, ["a", "b"])
    for f in (
        "ca.pem",
        "server.pem",
        "server.key",
        "clients/a/cert.pem",
        "clients/a/key.pem",
        "operator.token",
    ):
        assert (tmp_path / f).is_file(), f
    assert (tmp_path / "clients/a/key.pem").stat().st_mode & 0o077 == 0
    book = TokenBook(tmp_path / "tokens.json")
    token = (tmp_path / "clients/a/token").read_text()
    book.check("a", token)
    with pytest.raises(AuthError, match="wrong token"):
        book.check("a", "nope")
    with pytest.raises(AuthError, match="unknown client"):
        book.check("zed", token)
    revoke(tmp_path, "a")
    with pytest.raises(AuthError, match="revoked"):
        book.check("a", token)
    assert "sha256" in json.loads((tmp_path / "tokens.json").read_text())["clients"]["b"]
    assert token not in (tmp_path / "tokens.json").read_text()


def test_loopback_detection() -> None:
    assert is_loopback("127.0.0.1")
    assert is_loopback("localhost")
    assert is_loopback("[::1]")
    assert not is_loopback("0.0.0.0")
    assert not is_loopback("10.1.2.3")
    assert not is_loopback("example.org")


def test_pending_updates_round_trip_detect_lost_blobs_and_clear(tmp_path: Path) -> None:
    db = tmp_path / "state.sqlite"
    with NetState(db) as net:
        net.add_pending(1, 2, "c", '{"w": 1}', b"two", "attempt 1")
        net.add_pending(1, 0, "a", '{"w": 0}', b"zero", "attempt 1")
        staged = net.stage(1, 1, b"never recorded")  # e.g. the round closed meanwhile
        net.discard(staged)
        net.add_pending(2, 0, "a", "{}", b"next", "attempt 1")
        assert [(p.client_id, p.meta_json, p.blob) for p in net.pending(1)] == [
            (0, '{"w": 0}', b"zero"),
            (2, '{"w": 1}', b"two"),
        ]
        assert [(a.round, a.client, a.bytes) for a in net.audit_rows("accepted")] == [
            (1, "c", 3),
            (1, "a", 4),
            (2, "a", 4),
        ]
        # The discarded slot was reused (overwritten in place and cut to size) by round 2's update.
        assert len(list(net.blob_dir.iterdir())) == 3
        # A blob damaged outside the process (only an OS crash can do that) is reported, not used.
        (row,) = (
            sqlite3.connect(db).execute("SELECT file FROM pending_updates WHERE client_id = 2").fetchall()
        )
        (net.blob_dir / row[0]).write_bytes(b"tw0")
        assert [p.client_id for p in net.pending(1)] == [0]
        assert net.lost_pending(1) == [2]
        net.clear_pending(1)
        assert net.pending(1) == []
        assert [p.blob for p in net.pending(2)] == [b"next"]
        # Round 1's two slots are free again: the next two uploads overwrite them, no new file appears.
        net.add_pending(3, 0, "a", "{}", b"x" * 10, "attempt 1")
        net.add_pending(3, 1, "b", "{}", b"y", "attempt 1")
        assert len(list(net.blob_dir.iterdir())) == 3
        assert [p.blob for p in net.pending(3)] == [b"x" * 10, b"y"]
    # A restart finds the free slots again and removes files no row names that are not slots.
    (net.blob_dir / ".r000003-c000004-abc.tmp").write_bytes(b"killed mid-write by an older version")
    with NetState(db) as net:
        assert [p.blob for p in net.pending(2)] == [b"next"]
        assert [p.blob for p in net.pending(3)] == [b"x" * 10, b"y"]
        assert len(list(net.blob_dir.iterdir())) == 3
        net.clear_pending(3)
        for i in range(4):  # three reused slots, then one new file
            net.add_pending(4, i, str(i), "{}", bytes([i]) * 5, "attempt 1")
        assert len(list(net.blob_dir.iterdir())) == 4
        assert [p.blob for p in net.pending(4)] == [bytes([i]) * 5 for i in range(4)]
        net.clear_pending(3)
        net.drop_free_slots()  # the run is over: free slots go, live rows keep their files
        assert len(list(net.blob_dir.iterdir())) == 4
        net.clear_pending(4)
        net.drop_free_slots()
        assert not list(net.blob_dir.iterdir())


_KILLED_MID_ROUND = """
import os, signal, sys
from pathlib import Path
from fedloom.net.state import NetState
db, blob = Path(sys.argv[1]), Path(sys.argv[2]).read_bytes()
net = NetState(db)
net.add_pending(1, 0, "a", "{}", blob, "attempt 1")
net.add_pending(1, 1, "b", "{}", blob[::-1], "attempt 1")
net.clear_pending(1)  # round 1 committed: its two slots (and their kept mappings) are reused
net.add_pending(2, 1, "b", "{}", blob[1:] + blob[:1], "attempt 1")
net.add_pending(2, 0, "a", "{}", blob[::-1], "attempt 1")
os.kill(os.getpid(), signal.SIGKILL)  # no close, no flush, no msync
"""


def test_pending_blobs_survive_the_server_process_being_killed(tmp_path: Path) -> None:
    """Slot files are written through kept shared mappings; once a row commits, SIGKILL loses nothing."""
    blob = bytes(range(256)) * 1200 + b"tail"  # 307,204 bytes: several pages, not page aligned
    (tmp_path / "blob").write_bytes(blob)
    db = tmp_path / "state.sqlite"
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_MID_ROUND, str(db), str(tmp_path / "blob")],
        env=cli_env(),
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    with NetState(db) as net:
        assert net.lost_pending(2) == []
        assert [(p.client_id, p.blob) for p in net.pending(2)] == [
            (0, blob[::-1]),
            (1, blob[1:] + blob[:1]),
        ]
        assert sorted(f.name for f in net.blob_dir.iterdir()) == ["slot-000001.bin", "slot-000002.bin"]


def test_a_pending_row_whose_file_fails_its_checksum_is_lost_not_restored(tmp_path: Path) -> None:
    """Rows are checked against the XXH3-64 of their slot file: a torn or stale file, or a checksum
    in any other form, is a lost update (asked for again), never restored."""
    with NetState(tmp_path / "state.sqlite") as net:
        for cid, blob in enumerate((b"good", b"torn", b"stale", b"other")):
            net.add_pending(5, cid, f"c{cid}", "{}", blob, "attempt 1")
        rows = net._db.execute(
            "SELECT client_id, file, checksum FROM pending_updates ORDER BY client_id"
        ).fetchall()
        files = {int(c): net.blob_dir / str(f) for c, f, _ in rows}
        # XXH3-64 of b"good", from the xxhash package's reference implementation
        assert rows[0][2] == f"xxh3:{xxhash.xxh3_64_intdigest(b'good'):016x}"
    files[1].write_bytes(b"tor")  # torn
    files[2].write_bytes(b"state")  # same size, other bytes
    con = sqlite3.connect(tmp_path / "state.sqlite")
    con.execute(
        "UPDATE pending_updates SET checksum = ? WHERE client_id = 3",
        (f"crc32:{zlib.crc32(b'other'):08x}",),
    )
    con.commit()
    con.close()
    with NetState(tmp_path / "state.sqlite") as net:
        assert [(p.client_id, p.blob) for p in net.pending(5)] == [(0, b"good")]
        assert net.lost_pending(5) == [1, 2, 3]


def test_round_timing_reports_arrivals_and_acceptances_since_opening() -> None:
    """The ingest queue's lag is last acceptance minus last arrival; values by hand, in ms."""
    t = RoundTiming(opened=100.0)
    t.add_download(100.001, 100.004)
    t.add_upload(0.002, 100.020, 0.003, 0.001, 100.030)  # arrived 20 ms in, accepted at 30 ms
    t.add_upload(0.001, 100.010, 0.002, 0.002, 100.045)  # arrived first but accepted last
    s = t.summary()
    assert (s["downloads"], s["last_download_at_ms"]) == (1, 4.0)
    assert s["uploads"] == 2
    assert (s["first_arrival_at_ms"], s["last_arrival_at_ms"]) == (10.0, 20.0)
    assert (s["first_accept_at_ms"], s["last_accept_at_ms"]) == (30.0, 45.0)
    assert s["upload_receive_sum_ms"] == 3.0
    assert s["upload_validate_sum_ms"] == 5.0
    assert s["upload_store_sum_ms"] == 3.0


def _coordinator(tmp_path: Path, clients: int) -> tuple[Coordinator, NetState]:
    net = NetState(tmp_path / "state.sqlite")
    names = [f"c{i}" for i in range(clients)]
    return Coordinator(
        names, net, build_pipeline(ExperimentConfig()), JsonLog("t", stream=io.StringIO())
    ), net


def _open(
    coord: Coordinator, r: int, params: Params, *, selected: list[int], target: int, deadline_s: float
) -> str:
    b = Broadcast(round=r, params=params)
    blob = encode_broadcast(b)
    digest = hashlib.sha256(blob).hexdigest()
    coord.open_round(
        b,
        blob,
        digest,
        attempt=1,
        selected=selected,
        target=target,
        deadline_s=deadline_s,
        ctx=ServerContext(seed=0, round=r, population=len(coord.names)),
    )
    return digest


def test_round_closes_when_every_selected_client_answered_not_at_its_deadline(tmp_path: Path) -> None:
    """Two accepted updates and one failure report close a 3-client round at once (deadline 60 s).

    The round loop is woken only when the round can close: this fails (times out) if an answer that
    completes the round does not wake it, and checks that the earlier answers did not close it.
    """
    coord, net = _coordinator(tmp_path, 3)
    params = _p(0)
    digest = _open(coord, 1, params, selected=[0, 1, 2], target=3, deadline_s=60.0)
    closed: list[Any] = []
    waiter = threading.Thread(target=lambda: closed.append(coord.wait_close()))
    waiter.start()
    for cid in (0, 2):
        update = ClientUpdate(
            cid, params.map(lambda v, c=cid: torch.full_like(v, float(c))), 1.0 + cid, 5, 1, {}
        )
        meta, blob = encode_update(update)
        assert coord.submit(cid, 1, digest, meta, blob) is None
        waiter.join(timeout=0.2)
        assert waiter.is_alive(), "the round closed before every selected client answered"
    start = time.monotonic()
    assert coord.report_failure(1, 1, "diverged: loss is NaN") is None
    waiter.join(timeout=10)
    assert not waiter.is_alive()
    assert time.monotonic() - start < 5
    (c,) = closed
    assert [u.client_id for u in c.updates] == [0, 2]
    assert c.failed == {1: "diverged: loss is NaN"}
    assert c.dropouts == []
    assert float(c.updates[1].delta["w"][0, 0]) == 2.0
    net.clear_pending(1)


def test_parked_get_task_calls_wake_when_a_round_opens_and_when_the_run_ends(tmp_path: Path) -> None:
    """The event-loop server's long-poll: parked calls (wait_s = 20) answer within seconds of the
    round opening (TRAIN for the selected client, with the model; the other stays parked and gets
    WAIT at its own timeout) and of the run ending (DONE), over a real gRPC channel."""
    import grpc

    from fedloom.net.service import Service
    from fedloom.net.serving import AsyncServer, ServerOptions

    cfg = ExperimentConfig.model_validate({"deploy": {"clients": ["c0", "c1"]}})
    coord, net = _coordinator(tmp_path, 2)
    service = Service(coord, cfg, None, False, net, JsonLog("t", stream=io.StringIO()), "run")
    server = AsyncServer(service, cfg, ServerOptions(listen="127.0.0.1:0"))
    port = server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    task = channel.unary_unary(
        "/fedloom.net.v1.Coordinator/GetTask",
        request_serializer=pb.TaskRequest.SerializeToString,
        response_deserializer=pb.TaskReply.FromString,
    )
    got: dict[str, tuple[Any, float]] = {}

    def poll(name: str, wait_s: float) -> None:
        reply = task(pb.TaskRequest(wait_s=wait_s), metadata=(("fedloom-client", name),), timeout=60)
        got[name] = (reply, time.monotonic())

    try:
        pollers = [threading.Thread(target=poll, args=(n, w)) for n, w in (("c0", 20.0), ("c1", 3.0))]
        for t in pollers:
            t.start()
        time.sleep(0.5)
        assert got == {}, "a long-poll answered before there was anything to say"
        params = _p(0)
        opened = time.monotonic()
        digest = _open(coord, 1, params, selected=[0], target=1, deadline_s=60.0)
        pollers[0].join(timeout=10)
        reply, at = got["c0"]
        assert reply.kind == pb.TRAIN
        assert (reply.round, reply.broadcast_digest) == (1, digest)
        assert at - opened < 5
        assert decode_broadcast(reply.broadcast, 1).params.equal(params)
        pollers[1].join(timeout=10)
        assert got["c1"][0].kind == pb.WAIT  # not selected: parked until its own 3 s ran out
        done = threading.Thread(target=poll, args=("c1", 20.0))
        done.start()
        time.sleep(0.5)
        ended = time.monotonic()
        coord.set_done()
        done.join(timeout=10)
        assert got["c1"][0].kind == pb.DONE
        assert got["c1"][1] - ended < 5
    finally:
        channel.close()
        server.stop(grace=0.5)
        net.close()


def test_accepted_updates_are_read_from_their_slot_and_a_rejected_one_frees_its_slot(tmp_path: Path) -> None:
    """An update is written to its slot file, then decoded as views of the slot's mapping (no copy of
    its own); one rejected after staging (NaN) gives its slot back, so the next upload reuses it."""
    coord, net = _coordinator(tmp_path, 2)
    params = _p(0)
    digest = _open(coord, 1, params, selected=[0, 1], target=2, deadline_s=60.0)
    nan = params.map(lambda v: torch.full_like(v, float("nan")))
    meta, blob = encode_update(ClientUpdate(0, nan, 1.0, 5, 1, {}))
    assert coord.submit(0, 1, digest, meta, blob) == "update delta contains NaN or infinite values"
    sent = {c: params.map(lambda v, c=c: v + c) for c in (0, 1)}
    for c in (0, 1):
        meta, blob = encode_update(ClientUpdate(c, sent[c], 1.0 + c, 5, 1, {}))
        assert coord.submit(c, 1, digest, meta, blob) is None
    files = sorted(p.name for p in net.blob_dir.iterdir())
    assert len(files) == 2, files  # the NaN update's slot was reused, not leaked
    closed = coord.wait_close()
    assert [u.client_id for u in closed.updates] == [0, 1]
    for u in closed.updates:
        assert u.delta.equal(sent[u.client_id])
    # the tensors are the slot file's page cache: a write to the file shows through
    (row,) = [r for r in net.audit_rows("accepted") if r.client_id == 1]
    path = next(
        net.blob_dir / str(f)
        for (f,) in sqlite3.connect(net.path).execute("SELECT file FROM pending_updates WHERE client_id = 1")
    )
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    entry = json.loads(data[8 : 8 + header])["delta/b"]
    at = 8 + header + entry["data_offsets"][0]
    with path.open("r+b") as f:
        f.seek(at)
        f.write(torch.tensor([123.0]).numpy().tobytes())
    assert float(closed.updates[1].delta["b"][0]) == 123.0
    assert row.bytes == len(blob)
    net.clear_pending(1)
    net.close()
