"""The SecAgg round end to end: correctness, dropouts, aborts, tampering, what the server sees."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import numpy as np
import pytest

from fedloom.core.errors import ConfigError
from fedloom.secagg import client, server
from fedloom.secagg.errors import ProtocolViolation, SecAggAbort, ShareDecryptionError
from fedloom.secagg.fixedpoint import FixedPoint, encode, from_wire, to_wire
from fedloom.secagg.graph import complete_graph
from fedloom.secagg.messages import (
    EncryptedShare,
    RevealedShare,
    RoundParams,
    ShareInbox,
    UnmaskRequest,
    UnmaskResponse,
)
from fedloom.secagg.simulate import simulate_secure_sum


def vectors(n: int, length: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1, 1, size=length) for _ in range(n)]


def plain_sum(xs: list[np.ndarray], ids: tuple[int, ...]) -> np.ndarray:
    return np.sum([xs[i] for i in ids], axis=0)


def test_unmasked_sum_equals_plain_sum_within_bound() -> None:
    xs = vectors(8, 500)
    r = simulate_secure_sum(xs, clip=1.0)
    assert r.included == tuple(range(8))
    assert np.max(np.abs(r.total - plain_sum(xs, r.included))) <= r.error_bound
    assert r.error_bound < 1e-7  # 32-bit ring, 8 clients, clip 1


@pytest.mark.parametrize(
    ("before", "after"),
    [(set(), {0, 1, 2, 3}), ({4, 5, 6, 7}, set()), ({0, 9}, {3, 5})],
)
def test_dropouts_up_to_threshold_still_recover(before: set[int], after: set[int]) -> None:
    xs = vectors(10, 200, seed=1)
    r = simulate_secure_sum(
        xs, clip=1.0, threshold=6, dropouts_before_masking=before, dropouts_after_masking=after
    )
    assert set(r.included) == set(range(10)) - before
    assert np.max(np.abs(r.total - plain_sum(xs, r.included))) <= r.error_bound


@pytest.mark.parametrize(
    ("before", "after"),
    [(set(), {0, 1, 2, 3, 4}), ({0, 1, 2, 3, 4}, set()), ({0, 1}, {2, 3, 4})],
)
def test_dropouts_beyond_threshold_abort_without_a_sum(before: set[int], after: set[int]) -> None:
    with pytest.raises(SecAggAbort) as info:
        simulate_secure_sum(
            vectors(10, 50),
            clip=1.0,
            threshold=6,
            dropouts_before_masking=before,
            dropouts_after_masking=after,
        )
    assert (info.value.needed, info.value.available) == (6, 5)


@pytest.mark.parametrize("threshold", [5, 11])
def test_threshold_outside_majority_range_is_a_config_error(threshold: int) -> None:
    with pytest.raises(ConfigError, match="threshold"):
        simulate_secure_sum(vectors(10, 5), clip=1.0, threshold=threshold)


def test_sum_is_reproducible_although_masks_are_fresh() -> None:
    xs = vectors(6, 300, seed=2)
    a = simulate_secure_sum(xs, clip=1.0, dropouts_before_masking={2})
    b = simulate_secure_sum(xs, clip=1.0, dropouts_before_masking={2})
    assert np.array_equal(a.total, b.total)  # bit for bit
    ya = [m.masked for m in a.server_received if hasattr(m, "masked")]
    yb = [m.masked for m in b.server_received if hasattr(m, "masked")]
    assert all(p != q for p, q in zip(ya, yb, strict=True))  # CSPRNG masks differ run to run


def _byte_fields(obj: object) -> Iterator[bytes]:
    if isinstance(obj, bytes):
        yield obj
    elif isinstance(obj, tuple):
        for item in obj:
            yield from _byte_fields(item)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _byte_fields(getattr(obj, f.name))


def test_server_never_receives_an_unmasked_input() -> None:
    xs = vectors(7, 400, seed=3)
    r = simulate_secure_sum(xs, clip=1.0, dropouts_before_masking={1}, dropouts_after_masking={4})
    fp = FixedPoint(1.0, bits=32, max_clients=7)
    encoded = [encode(x, fp) for x in xs]
    wires = {to_wire(e, 32) for e in encoded}
    fields = list(_byte_fields(r.server_received))
    assert fields
    assert not any(f in wires for f in fields)
    masked = [m for m in r.server_received if type(m).__name__ == "MaskedInput"]
    assert len(masked) == 6
    for m in masked:
        y = from_wire(m.masked, 32, 400)
        for e in encoded:  # not the input, nor any other client's, even coordinate-wise
            assert np.mean(y == e) < 0.01


def test_a_masked_vector_is_indistinguishable_from_uniform() -> None:
    # The most structured input there is (all zeros), and one client's view; chi-square at level 1e-6.
    length = 1 << 15
    xs = [np.zeros(length) for _ in range(4)]
    r = simulate_secure_sum(xs, clip=1.0)
    y = from_wire(next(m for m in r.server_received if type(m).__name__ == "MaskedInput").masked, 32, length)
    counts = np.bincount((y >> np.uint64(24)).astype(np.int64), minlength=256)
    stat = float(np.sum((counts - length / 256) ** 2 / (length / 256)))
    critical = 255 * (1 - 2 / (9 * 255) + 4.7534 * math.sqrt(2 / (9 * 255))) ** 3
    assert stat < critical
    # The test has power: the encoded input itself is rejected.
    e = encode(vectors(1, length)[0], FixedPoint(1.0, max_clients=4))
    counts = np.bincount((e >> np.uint64(24)).astype(np.int64), minlength=256)
    assert float(np.sum((counts - length / 256) ** 2 / (length / 256))) > critical


def _run_to_inboxes(
    n: int, t: int
) -> tuple[RoundParams, dict[int, client.ClientSharing], server.ServerSharing, dict[int, ShareInbox]]:
    params = RoundParams(session=b"s" * 16, threshold=t, bits=32, length=8)
    started = [client.advertise_keys(params, i) for i in range(n)]
    s0, rosters = server.collect_keys(params, complete_graph(range(n)), [a for _, a in started])
    sharing, msgs = {}, []
    for u, roster in rosters.items():
        sharing[u], m = client.share_keys(started[u][0], roster)
        msgs.append(m)
    s1, inboxes = server.route_shares(s0, msgs)
    return params, sharing, s1, inboxes


def test_tampered_share_is_detected_and_names_the_sender() -> None:
    _, sharing, _, inboxes = _run_to_inboxes(4, 3)
    inbox = inboxes[2]
    victim = inbox.shares[1]
    flipped = bytearray(victim.ciphertext)
    flipped[20] ^= 0x40
    tampered = ShareInbox(
        2, (inbox.shares[0], EncryptedShare(victim.sender, 2, bytes(flipped)), *inbox.shares[2:])
    )
    with pytest.raises(ShareDecryptionError) as info:
        client.masked_input(sharing[2], tampered, np.zeros(8, dtype=np.uint64))
    assert (info.value.sender, info.value.receiver) == (victim.sender, 2)


def test_rerouted_share_is_detected() -> None:
    # The server relabels client 0's share for client 1 as one for client 2: AEAD binds the receiver.
    _, sharing, _, inboxes = _run_to_inboxes(4, 3)
    to_one = next(s for s in inboxes[1].shares if s.sender == 0)
    rest = tuple(s for s in inboxes[2].shares if s.sender != 0)
    fake = ShareInbox(2, (EncryptedShare(0, 2, to_one.ciphertext), *rest))
    with pytest.raises(ShareDecryptionError) as info:
        client.masked_input(sharing[2], fake, np.zeros(8, dtype=np.uint64))
    assert info.value.sender == 0


def test_corrupted_key_share_is_rejected_by_the_server() -> None:
    _params, sharing, s1, inboxes = _run_to_inboxes(5, 3)
    masked = {u: client.masked_input(sharing[u], inboxes[u], np.zeros(8, dtype=np.uint64)) for u in range(4)}
    s2, request = server.collect_masked(s1, [m for _, m in masked.values()])
    responses = [client.unmask(st, request) for st, _ in masked.values()]
    r0 = responses[0]
    (ks,) = r0.key_shares  # the share of dropped client 4's mask key
    bad = RevealedShare(ks.owner, ks.holder, bytes(len(ks.share)))
    responses[0] = UnmaskResponse(r0.sender, r0.self_mask_shares, (bad,))
    with pytest.raises(ProtocolViolation):
        server.unmask(s2, responses)


def test_duplicate_and_foreign_messages_are_protocol_violations() -> None:
    _params, sharing, s1, inboxes = _run_to_inboxes(4, 3)
    _, y = client.masked_input(sharing[0], inboxes[0], np.zeros(8, dtype=np.uint64))
    with pytest.raises(ProtocolViolation):
        server.collect_masked(s1, [y, y])
    with pytest.raises(ProtocolViolation):
        client.masked_input(sharing[0], inboxes[1], np.zeros(8, dtype=np.uint64))


def test_client_refuses_to_unmask_below_threshold() -> None:
    _, sharing, _s1, inboxes = _run_to_inboxes(5, 4)
    masked = {u: client.masked_input(sharing[u], inboxes[u], np.zeros(8, dtype=np.uint64)) for u in range(5)}
    # A server that claims only three survivors must not get self-mask shares from anyone.
    with pytest.raises(SecAggAbort):
        client.unmask(masked[0][0], UnmaskRequest((0, 1, 2)))
