"""The server side of SecAgg / SecAgg+ as a state machine over the round messages.

``collect_keys``    round 0: fix U1 and send each client its neighbours' keys.
``route_shares``    round 1: fix U2 and relay the sealed shares (it cannot open them).
``collect_masked``  round 2: fix U3 = clients whose masked input arrived.
``unmask``          round 3: from the revealed shares of U4, rebuild ``b_u`` for
                    every ``u`` in U3 and ``s_v^SK`` for every ``v`` in U2 \\ U3,
                    strip the self-masks and the dropped clients' pairwise masks
                    and return ``sum_{u in U3} x_u mod 2^bits``.

Notes
-----
Threat model: what this server ever receives is public keys, AEAD ciphertexts
it has no key for, masked vectors ``y_u`` (uniform over Z_{2^bits} on their own,
because ``PRG(b_u)`` is), and -- from honest clients -- at most one kind of share
per owner. It learns ``b_u`` only for clients whose ``y_u`` is in the sum and
``s_v^SK`` only for clients that are not, so no individual ``x_u`` is ever
exposed; the only value it unmasks is the sum. Fewer than ``threshold`` shares
for any needed secret aborts the round (:class:`SecAggAbort`) with no output.
A group is a client plus its graph neighbours; clients whose group shrinks
below the threshold before masking are dropped from the round (safe: nobody
has used their masks yet).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from fedloom.core.errors import UpdateError
from fedloom.secagg import keys, shamir
from fedloom.secagg.errors import ProtocolViolation, SecAggAbort
from fedloom.secagg.fixedpoint import from_wire
from fedloom.secagg.graph import Graph
from fedloom.secagg.messages import (
    AdvertiseKeys,
    EncryptedShare,
    MaskedInput,
    Roster,
    RoundParams,
    ShareInbox,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from fedloom.secagg.prg import expand_mask

__all__ = [
    "SecureSum",
    "ServerKeys",
    "ServerMasked",
    "ServerSharing",
    "collect_keys",
    "collect_masked",
    "route_shares",
    "unmask",
]


@dataclass(frozen=True)
class ServerKeys:
    """After round 0: the graph and the keys of U1."""

    params: RoundParams
    graph: Graph
    adverts: Mapping[int, AdvertiseKeys]

    def group(self, u: int, alive: Iterable[int]) -> set[int]:
        return (set(self.graph.neighbours[u]) | {u}) & set(alive)


@dataclass(frozen=True)
class ServerSharing:
    keys: ServerKeys
    u2: frozenset[int]


@dataclass(frozen=True)
class ServerMasked:
    sharing: ServerSharing
    masked: Mapping[int, bytes]  # U3: sender -> y_u on the wire


@dataclass(frozen=True)
class SecureSum:
    """The round's output: ``encoded = sum_{u in included} x_u mod 2^bits``."""

    encoded: NDArray[np.uint64]
    included: tuple[int, ...]


def _unique_senders(senders: Sequence[int], allowed: Iterable[int], what: str) -> set[int]:
    allowed_set, seen = set(allowed), set()
    for s in senders:
        if s not in allowed_set or s in seen:
            raise ProtocolViolation(f"{what}: unexpected or duplicate message from client {s}")
        seen.add(s)
    return seen


def _prune(graph: Graph, alive: set[int], threshold: int) -> set[int]:
    """Drop clients whose group within ``alive`` is smaller than ``threshold``, until none is."""
    alive = set(alive)
    while True:
        thin = {u for u in alive if len((set(graph.neighbours[u]) | {u}) & alive) < threshold}
        if not thin:
            return alive
        alive -= thin


def collect_keys(
    params: RoundParams, graph: Graph, adverts: Sequence[AdvertiseKeys]
) -> tuple[ServerKeys, dict[int, Roster]]:
    """Round 0: U1 = advertisers whose group can reach the threshold; one roster per member."""
    senders = _unique_senders([a.sender for a in adverts], graph.ids, "advertise keys")
    u1 = _prune(graph, senders, params.threshold)
    if not u1:
        raise SecAggAbort(
            "advertise keys: no group of clients reached the threshold",
            needed=params.threshold,
            available=len(senders),
        )
    by_id = {a.sender: a for a in adverts if a.sender in u1}
    state = ServerKeys(params, graph, by_id)
    rosters = {u: Roster(u, tuple(by_id[v] for v in graph.neighbours[u] if v in u1)) for u in sorted(u1)}
    return state, rosters


def route_shares(
    state: ServerKeys, messages: Sequence[ShareKeys]
) -> tuple[ServerSharing, dict[int, ShareInbox]]:
    """Round 1: check each message has one share per roster neighbour; U2 and one inbox per member."""
    senders = _unique_senders([m.sender for m in messages], state.adverts, "share keys")
    for m in messages:
        expected = state.group(m.sender, state.adverts) - {m.sender}
        got = [s.receiver for s in m.shares]
        if any(s.sender != m.sender for s in m.shares) or sorted(got) != sorted(expected):
            raise ProtocolViolation(
                f"share keys: client {m.sender} did not send exactly one share per neighbour"
            )
    u2 = _prune(state.graph, senders, state.params.threshold)
    if not u2:
        raise SecAggAbort(
            "share keys: no group of clients reached the threshold",
            needed=state.params.threshold,
            available=len(senders),
        )
    inbox: dict[int, list[EncryptedShare]] = {u: [] for u in u2}
    for m in sorted(messages, key=lambda m: m.sender):
        if m.sender in u2:
            for s in m.shares:
                if s.receiver in u2:
                    inbox[s.receiver].append(s)
    return ServerSharing(state, frozenset(u2)), {u: ShareInbox(u, tuple(v)) for u, v in sorted(inbox.items())}


def collect_masked(
    state: ServerSharing, messages: Sequence[MaskedInput]
) -> tuple[ServerMasked, UnmaskRequest]:
    """Round 2: U3 = members of U2 whose (well-formed) masked input arrived."""
    params = state.keys.params
    _unique_senders([m.sender for m in messages], state.u2, "masked input")
    for m in messages:
        try:
            from_wire(m.masked, params.bits, params.length)
        except UpdateError as exc:
            raise ProtocolViolation(f"masked input from client {m.sender}: {exc}") from exc
    masked = {m.sender: m.masked for m in messages}
    if len(masked) < params.threshold:
        raise SecAggAbort(
            "masked input: too few clients sent masked inputs", needed=params.threshold, available=len(masked)
        )
    return ServerMasked(state, masked), UnmaskRequest(tuple(sorted(masked)))


def _collect(
    state: ServerMasked, responses: Sequence[UnmaskResponse]
) -> tuple[dict[int, dict[int, bytes]], dict[int, dict[int, bytes]]]:
    """Validate the responses; return ``owner -> holder -> share`` for self-masks and mask keys."""
    u2, u3, k = state.sharing.u2, set(state.masked), state.sharing.keys
    b: dict[int, dict[int, bytes]] = {u: {} for u in u3}
    s: dict[int, dict[int, bytes]] = {v: {} for v in u2 - u3}
    for r in responses:
        group = k.group(r.sender, u2)
        for kind, items, table in (("self-mask", r.self_mask_shares, b), ("mask-key", r.key_shares, s)):
            for item in items:
                if item.holder != r.sender or item.owner not in group or item.owner not in table:
                    raise ProtocolViolation(
                        f"unmask: client {r.sender} sent an unexpected {kind} share of {item.owner}"
                    )
                table[item.owner][item.holder] = item.share
    return b, s


def _recover(owner: int, shares: Mapping[int, bytes], threshold: int, what: str) -> bytes:
    holders = sorted(shares)
    if len(holders) < threshold:
        raise SecAggAbort(
            f"unmask: cannot recover the {what} of client {owner}", needed=threshold, available=len(holders)
        )
    return shamir.combine([h + 1 for h in holders], [shares[h] for h in holders], threshold)


def unmask(state: ServerMasked, responses: Sequence[UnmaskResponse]) -> SecureSum:
    """Round 3: rebuild the needed secrets from U4's shares and return the unmasked sum."""
    k = state.sharing.keys
    params, u3 = k.params, sorted(state.masked)
    _unique_senders([r.sender for r in responses], u3, "unmask")
    if len(responses) < params.threshold:
        raise SecAggAbort(
            "unmask: too few clients answered", needed=params.threshold, available=len(responses)
        )
    b_shares, key_shares = _collect(state, responses)
    t = params.threshold
    # Recover every secret before touching the sum: any shortfall aborts with no output.
    seeds = {u: _recover(u, b_shares[u], t, "self-mask seed") for u in u3}
    dropped = {
        v: keys.private_from_bytes(_recover(v, key_shares[v], t, "mask key")) for v in sorted(key_shares)
    }
    z = np.zeros(params.length, dtype=np.uint64)
    for u in u3:
        z += from_wire(state.masked[u], params.bits, params.length)
        z -= expand_mask(seeds[u], params.length, params.bits)
    for v, sk in dropped.items():
        if keys.public_bytes(sk) != k.adverts[v].s_public:
            raise ProtocolViolation(
                f"unmask: the mask key rebuilt for client {v} does not match its public key"
            )
        for w in k.graph.neighbours[v]:
            if w in state.masked:
                shared = keys.agree(sk, k.adverts[w].s_public, peer=w)
                mask = expand_mask(
                    keys.derive_mask_seed(shared, params.session, v, w), params.length, params.bits
                )
                # y_w holds +mask if v > w and -mask if v < w; take it back out.
                if v > w:
                    z -= mask
                else:
                    z += mask
    return SecureSum(z & np.uint64((1 << params.bits) - 1), tuple(u3))
