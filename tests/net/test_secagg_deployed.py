"""Secure aggregation in deployment: the relay in-process, then real server and client processes."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.net.helpers import HOSPITALS, Proc, client, free_port, server, write_config

from fedloom.core.serde import params_from_bytes
from fedloom.engine import BytesMoved, ClientAccepted, read_events
from fedloom.net.secure import SecureOutcome, SecureParams, SecureRelay
from fedloom.net.wire import UpdateMeta, decode_secagg, encode_secagg
from fedloom.results.store import RunStore
from fedloom.secagg import client as sa
from fedloom.secagg.errors import SecAggAbort
from fedloom.secagg.fixedpoint import FixedPoint, encode, sum_error_bound
from fedloom.secagg.graph import complete_graph
from fedloom.secagg.messages import (
    AdvertiseKeys,
    EncryptedShare,
    Roster,
    ShareInbox,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)

pytest.importorskip("cryptography", reason="secure aggregation needs the 'secure' extra")


def test_secagg_messages_round_trip_through_the_wire_codec() -> None:
    a = AdvertiseKeys(3, b"\x00c" * 16, b"s" * 32)
    for m in (
        a,
        Roster(1, (a, AdvertiseKeys(4, b"", b"\xff"))),
        ShareKeys(2, (EncryptedShare(2, 5, b"ct"),)),
        UnmaskRequest((0, 2, 7)),
    ):
        assert decode_secagg(encode_secagg(m), type(m)) == m
    with pytest.raises(Exception, match="expected a Roster"):
        decode_secagg(encode_secagg(a), Roster)


def _party(
    relay: SecureRelay,
    cid: int,
    x: np.ndarray,
    stop_before: int,
    out: dict[int, str],
    sent: dict[int, list[int]],
) -> None:
    """One client's four stages against ``relay`` directly; it vanishes before stage ``stop_before``.
    ``sent[cid]`` counts the bytes it sent and received."""
    p = relay.params
    sent[cid] = [0, 0]
    exchange = relay.exchange

    def counted(cid: int, stage: int, payload: bytes, meta_json: str = "") -> tuple[bytes, str]:
        reply, err = exchange(cid, stage, payload, meta_json)
        sent[cid][0] += len(payload)
        sent[cid][1] += len(reply)
        return reply, err

    meta = UpdateMeta(weight=1.0, num_examples=10, num_steps=1, metrics={}, compute_s=0.0).to_json()
    keys, advert = sa.advertise_keys(p.round_params(), cid)
    reply, err = counted(cid, 0, encode_secagg(advert), meta)
    if err or stop_before <= 1:
        out[cid] = err or "left"
        return
    sharing, shares = sa.share_keys(keys, decode_secagg(reply, Roster))
    reply, err = counted(cid, 1, encode_secagg(shares))
    if err or stop_before <= 2:
        out[cid] = err or "left"
        return
    masked, y = sa.masked_input(sharing, decode_secagg(reply, ShareInbox), encode(x, p.fixed_point()))
    reply, err = counted(cid, 2, encode_secagg(y))
    if err or stop_before <= 3:
        out[cid] = err or "left"
        return
    resp: UnmaskResponse = sa.unmask(masked, decode_secagg(reply, UnmaskRequest))
    out[cid] = counted(cid, 3, encode_secagg(resp))[1] or "done"


def _run_relay(
    n: int, stop_before: dict[int, int], threshold: int, sent: dict[int, list[int]] | None = None
) -> tuple[SecureOutcome, np.ndarray]:
    cohort = list(range(10, 10 + n))
    graph = complete_graph(cohort)
    params = SecureParams.fresh(graph, threshold=threshold, bits=32, length=5, clip=1.0, max_weight=1.0)
    relay = SecureRelay(params, graph, target=n, deadline=time.monotonic() + 10, stage_timeout_s=0.5)
    xs = {c: np.linspace(-0.5, 0.5, 5) * (i + 1) / n for i, c in enumerate(cohort)}
    out: dict[int, str] = {}
    sent = {} if sent is None else sent
    threads = [
        threading.Thread(target=_party, args=(relay, c, xs[c], stop_before.get(c, 9), out, sent))
        for c in cohort
    ]
    for t in threads:
        t.start()
    try:
        outcome = relay.run()
    finally:
        for t in threads:
            t.join(timeout=10)
    expected = sum(xs[c] for c in outcome.included)
    assert isinstance(expected, np.ndarray)
    return outcome, expected


def test_relay_recovers_from_dropouts_before_and_after_masking() -> None:
    # 11 drops before masking (left out of the sum), 12 after masking (kept in it).
    sent: dict[int, list[int]] = {}
    outcome, expected = _run_relay(5, {11: 2, 12: 3}, threshold=3, sent=sent)
    assert outcome.included == (10, 12, 13, 14)
    # The relay's traffic count is what the parties sent and received, byte for byte.
    assert outcome.bytes_up == {c: up for c, (up, _) in sent.items()}
    assert outcome.bytes_down == sum(down for _, down in sent.values())
    assert sorted(outcome.metas) == [10, 12, 13, 14]
    np.testing.assert_allclose(outcome.total, expected, atol=outcome.error_bound)


def test_relay_aborts_below_the_threshold_and_releases_every_waiting_client() -> None:
    with pytest.raises(SecAggAbort):
        _run_relay(4, {11: 3, 12: 3}, threshold=3)  # only 2 unmask responses for t = 3


SECAGG = """
[transforms]
clip_norm = 1.0
[secagg]
enabled = true
max_weight = 400.0
"""


def _start(cwd: Path, extra: str) -> tuple[Proc, list[Proc]]:
    """A 2-round fedavg deployment of the 4 hospitals in ``cwd``: (server, clients)."""
    cwd.mkdir()
    cfg = write_config(cwd / "exp.toml", extra)
    text = cfg.read_text().replace('name = "scaffold"', 'name = "fedavg"').replace("rounds = 4", "rounds = 2")
    cfg.write_text(text.replace("max_message_bytes = 4096", "max_message_bytes = 65536"))
    port = free_port()
    return server(cwd, cfg, port), [client(cwd, h, port) for h in HOSPITALS]


def test_deployed_secagg_matches_the_plain_run_and_never_receives_an_update(
    heart_dir: Path, tmp_path: Path
) -> None:
    # Both runs at once: same seed, same data, so the same clients train the same updates.
    runs = {
        "plain": _start(tmp_path / "plain", SECAGG.replace("enabled = true", "enabled = false")),
        "secure": _start(tmp_path / "secure", SECAGG),
    }
    try:
        for name, (srv, _) in runs.items():
            assert srv.wait(90) == 0, f"{name}: {srv.err.read_text()[-3000:]}"
    finally:
        for srv, clients in runs.values():
            for p in [srv, *clients]:
                p.stop()
    # Round 1 starts from the same model, so the clients send the same deltas and the two models
    # differ only by the protocol's fixed-point error on the mean, plus float32 rounding.
    with RunStore(tmp_path / "plain" / "srv" / "state.sqlite") as a:
        start, plain = a.load_state(0).params, a.load_state(1).params
    with RunStore(tmp_path / "secure" / "srv" / "state.sqlite") as b:
        assert b.load_state(0).params.equal(start)
        secure = b.load_state(1).params
    fp = FixedPoint(clip=1.0, bits=32, max_clients=len(HOSPITALS))  # the server's: clip_norm, bits, cohort
    sum_bound = sum_error_bound(fp, len(HOSPITALS))
    plain_rows = (tmp_path / "plain" / "srv" / "metrics.jsonl").read_text().splitlines()
    examples = json.loads(plain_rows[0])["num_examples"]
    weight_sum = examples / 400.0  # the summed weight coordinate: sum_u n_u / max_weight
    # |S_d/S_w - S_d'/S_w'| <= B (1 + |mean|) / (S_w - B), with |mean| <= clip = 1.
    mean_bound = sum_bound * 2.0 / (weight_sum - sum_bound)
    assert not all(torch.equal(secure[k], plain[k]) for k in plain)  # fixed point, not the plain path
    for k in plain:
        # float32: the plain weighted sum of 4 clipped deltas (|d| <= 1), the secure mean's cast, and
        # each side's x + delta.
        f32 = 2.0**-24 * (8.0 + 2.0 * plain[k].abs() + 2.0 * start[k].abs())
        err = (secure[k].double() - plain[k].double()).abs()
        assert bool((err <= mean_bound + f32.double()).all()), (k, float(err.max()))
    # Round 2's clients train from models that differ by the above, so the final models are no
    # longer bound by the protocol alone; they must still agree far below the model's scale.
    final_plain = params_from_bytes((tmp_path / "plain" / "srv" / "model.safetensors").read_bytes())
    final_secure = params_from_bytes((tmp_path / "secure" / "srv" / "model.safetensors").read_bytes())
    for k in final_plain:
        np.testing.assert_allclose(final_secure[k].numpy(), final_plain[k].numpy(), atol=1e-5, rtol=0)
    rows = [json.loads(x) for x in (tmp_path / "secure" / "srv" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["num_clients"], r["attempt"]) for r in rows] == [(1, 4, 1), (2, 4, 1)]
    assert len(runs["plain"][0].events("update_accepted")) == 8  # one per client and round...
    assert not runs["secure"][0].events("update_accepted")  # ...and none under SecAgg
    with sqlite3.connect(tmp_path / "secure" / "srv" / "state.sqlite") as db:
        events = [e for (e,) in db.execute("SELECT event FROM audit")]
        assert db.execute("SELECT COUNT(*) FROM pending_updates").fetchone() == (0,)
    # Every stored update writes an "accepted" audit row with its pending row; none here,
    # only the 4 masked vectors per round.
    assert events.count("secagg_masked") == 8
    assert not {"accepted", "rejected", "secagg_refused"} & set(events)
    # The event stream counts a secure round's traffic: each client's SecAgg messages (its masked
    # vector among them) up, and the replies plus the broadcast down.
    with sqlite3.connect(tmp_path / "secure" / "srv" / "state.sqlite") as db:
        masked = db.execute("SELECT round, client, bytes FROM audit WHERE event = 'secagg_masked'").fetchall()
    stream = list(read_events(tmp_path / "secure" / "srv" / "events.jsonl"))
    sent = {(e.round, e.client): e.bytes for e in stream if isinstance(e, ClientAccepted)}
    assert len(sent) == 8
    for r, name, nbytes in masked:
        assert sent[(r, name)] > nbytes  # the masked vector and the key exchange's messages
    for moved in (e for e in stream if isinstance(e, BytesMoved)):
        assert moved.up == sum(b for (r, _), b in sent.items() if r == moved.round)
        assert moved.down > 4 * sum(t.numel() * t.element_size() for t in final_plain.values())
    assert not list((tmp_path / "secure" / "srv").glob("**/r*-c*.safetensors"))


def test_deployed_secagg_with_qsgd_quantises_into_a_narrow_ring(heart_dir: Path, tmp_path: Path) -> None:
    """``compression.codec = "qsgd"`` under SecAgg: each client rounds stochastically onto a ring of
    ``8 + ceil(log2 4) = 10`` bits, so its masked vector takes 2 bytes a coordinate instead of 4,
    and the model stays within the quantisation error of the 32-bit secure run."""
    runs = {
        "wide": _start(tmp_path / "wide", SECAGG),
        "q8": _start(tmp_path / "q8", SECAGG + '[compression]\ncodec = "qsgd"\nbits = 8\n'),
    }
    try:
        for name, (srv, _) in runs.items():
            assert srv.wait(90) == 0, f"{name}: {srv.err.read_text()[-3000:]}"
    finally:
        for srv, clients in runs.values():
            for p in [srv, *clients]:
                p.stop()
    sizes = {}
    for name in runs:
        with sqlite3.connect(tmp_path / name / "srv" / "state.sqlite") as db:
            sizes[name] = [b for (b,) in db.execute("SELECT bytes FROM audit WHERE event = 'secagg_masked'")]
    assert len(sizes["q8"]) == 8
    for wide, narrow in zip(sizes["wide"], sizes["q8"], strict=True):
        assert abs(narrow / wide - 0.5) < 0.01, (narrow, wide)  # base64 JSON of 2- vs 4-byte elements
    with RunStore(tmp_path / "wide" / "srv" / "state.sqlite") as a:
        start, wide_model = a.load_state(0).params, a.load_state(1).params
    with RunStore(tmp_path / "q8" / "srv" / "state.sqlite") as b:
        assert b.load_state(0).params.equal(start)
        narrow_model = b.load_state(1).params
    # Stochastic rounding moves each client's weighted coordinate by less than one step 1/s,
    # s = 2^floor(log2(Q / clip)) with Q = (2^9 - 1) // 4 = 127: s = 64.
    n, step = len(HOSPITALS), 1 / 64
    rows = (tmp_path / "wide" / "srv" / "metrics.jsonl").read_text().splitlines()
    weight_sum = json.loads(rows[0])["num_examples"] / 400.0
    bound = n * step * 2.0 / (weight_sum - n * step) + 1e-5
    assert not all(torch.equal(narrow_model[k], wide_model[k]) for k in wide_model)
    for k in wide_model:
        err = (narrow_model[k].double() - wide_model[k].double()).abs()
        assert bool((err <= bound).all()), (k, float(err.max()), bound)
