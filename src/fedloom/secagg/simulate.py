"""In-process simulation of a SecAgg / SecAgg+ round with real cryptography.

:func:`simulate_secure_sum` runs the client and server state machines of
:mod:`client` and :mod:`server` over in-memory "channels", optionally dropping
clients at two points of the round, and decodes the fixed-point sum:

``dropouts_before_masking``
    complete the share round, then vanish: their input is *not* in the sum and
    the server rebuilds their mask keys to strip their pairwise masks;
``dropouts_after_masking``
    send their masked input, then vanish before unmasking: their input *is* in
    the sum and the others' shares rebuild their self-masks.

The round survives as long as every needed secret still has ``threshold``
holders; otherwise it raises :class:`SecAggAbort` and returns nothing.

Notes
-----
Threat model and reproducibility: secrets come from the OS CSPRNG even in
simulation -- there is no deterministic mode to leak into deployment. The
result is still reproducible: masks cancel exactly in Z_{2^bits}, so the
decoded sum depends only on the inputs and the set of included clients. The
SecAgg+ graph relabelling is the only seeded draw (``numpy_rng(seed,
"secagg-graph", round=round)``); it affects cost, never the sum.
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from fedloom.core.errors import ConfigError
from fedloom.core.rng import numpy_rng
from fedloom.secagg import client, server
from fedloom.secagg.fixedpoint import FixedPoint, decode_sum, encode, sum_error_bound
from fedloom.secagg.graph import Graph, complete_graph, default_threshold, harary_graph, secagg_plus_degree
from fedloom.secagg.messages import (
    AdvertiseKeys,
    MaskedInput,
    Roster,
    RoundParams,
    ShareInbox,
    ShareKeys,
    UnmaskResponse,
    wire_size,
)

__all__ = ["SecureSumResult", "simulate_secure_sum"]


@dataclass(frozen=True)
class SecureSumResult:
    """What a simulated round produced, plus its cost.

    ``total`` approximates ``sum_{u in included} clip(x_u)`` within ``error_bound``
    per coordinate. ``max_bytes_up``/``max_bytes_down`` are the traffic of the
    busiest client (one that completes the round); ``client_seconds`` is summed
    over all clients; ``server_received`` is every message the server was handed.
    """

    total: NDArray[np.float64]
    included: tuple[int, ...]
    error_bound: float
    graph: Graph
    threshold: int
    max_bytes_up: int
    max_bytes_down: int
    client_seconds: float
    server_seconds: float
    server_received: tuple[object, ...]


def _build_graph(
    n: int, graph: Literal["complete", "harary"], degree: int | None, seed: int, round: int
) -> Graph:
    if graph == "complete":
        return complete_graph(range(n))
    k = secagg_plus_degree(n) if degree is None else degree
    return harary_graph(range(n), k, numpy_rng(seed, "secagg-graph", round=round))


def simulate_secure_sum(
    vectors: Sequence[NDArray[np.floating]],
    *,
    clip: float,
    threshold: int | None = None,
    graph: Literal["complete", "harary"] = "complete",
    degree: int | None = None,
    bits: int = 32,
    max_clients: int | None = None,
    dropouts_before_masking: Collection[int] = (),
    dropouts_after_masking: Collection[int] = (),
    seed: int = 0,
    round: int = 0,
    fixed_point: FixedPoint | None = None,
    encoded: Sequence[NDArray[np.uint64]] | None = None,
) -> SecureSumResult:
    """Securely sum ``vectors`` (client ``i`` holds ``vectors[i]``) in one simulated round.

    ``threshold`` is the Shamir ``t`` per share group (default
    :func:`default_threshold` of the largest group); ``graph="harary"`` selects
    SecAgg+ with ``degree`` (default :func:`secagg_plus_degree`). Raises
    :class:`ConfigError` for invalid arguments and :class:`SecAggAbort` when too
    many clients drop out. ``fixed_point`` and ``encoded`` replace the default encoding: the
    clients' inputs already in the ring (e.g. :func:`fedloom.transforms.compression.ring.quantize_into_ring`),
    decoded with ``fixed_point`` (whose ``bits`` must equal ``bits``).
    """
    n = len(vectors)
    length = int(np.asarray(vectors[0]).size) if n else 0
    problems = []
    if n < 1 or any(np.asarray(v).size != length for v in vectors):
        problems.append("vectors must be a non-empty sequence of equally sized arrays")
    before, after = set(dropouts_before_masking), set(dropouts_after_masking)
    if not before | after <= set(range(n)) or before & after:
        problems.append("dropouts must be disjoint sets of client indices in [0, len(vectors))")
    if problems:
        raise ConfigError(problems)
    fp = fixed_point or FixedPoint(clip, bits=bits, max_clients=n if max_clients is None else max_clients)
    g = _build_graph(n, graph, degree, seed, round)
    group = g.max_degree() + 1
    t = default_threshold(group) if threshold is None else threshold
    if not group / 2 < t <= group:
        # A majority threshold: two disjoint sets of honest holders can never both reconstruct.
        raise ConfigError(
            [f"threshold must be in ({group / 2}, {group}] for share groups of {group}, got {t}"]
        )
    params = RoundParams(session=os.urandom(16), threshold=t, bits=bits, length=length)

    def clock() -> float:
        return time.perf_counter()

    # Round 0: advertise keys.
    t0 = clock()
    if encoded is None:
        encoded = [encode(np.asarray(v), fp) for v in vectors]
    k_states, adverts = zip(*(client.advertise_keys(params, i) for i in range(n)), strict=True)
    t1 = clock()
    s_keys, rosters = server.collect_keys(params, g, list(adverts))
    t2 = clock()
    # Round 1: share keys.
    sharing: dict[int, client.ClientSharing] = {}
    share_msgs: list[ShareKeys] = []
    for u, roster in rosters.items():
        sharing[u], shares = client.share_keys(k_states[u], roster)
        share_msgs.append(shares)
    t3 = clock()
    s_sharing, inboxes = server.route_shares(s_keys, share_msgs)
    t4 = clock()
    # Round 2: masked input, minus the clients that drop before masking.
    masked: dict[int, client.ClientMasked] = {}
    masked_msgs: list[MaskedInput] = []
    for u, inbox in inboxes.items():
        if u not in before:
            masked[u], y = client.masked_input(sharing[u], inbox, encoded[u])
            masked_msgs.append(y)
    t5 = clock()
    s_masked, request = server.collect_masked(s_sharing, masked_msgs)
    t6 = clock()
    # Round 3: unmasking, minus the clients that drop after masking.
    responses = [client.unmask(masked[u], request) for u in request.survivors if u not in after]
    t7 = clock()
    result = server.unmask(s_masked, responses)
    total = decode_sum(result.encoded, fp, num_clients=len(result.included))
    t8 = clock()
    tc = (t1 - t0) + (t3 - t2) + (t5 - t4) + (t7 - t6)
    ts = (t2 - t1) + (t4 - t3) + (t6 - t5) + (t8 - t7)
    received: list[AdvertiseKeys | ShareKeys | MaskedInput | UnmaskResponse] = [
        *adverts,
        *share_msgs,
        *masked_msgs,
        *responses,
    ]
    up: dict[int, int] = dict.fromkeys(range(n), 0)
    down: dict[int, int] = dict.fromkeys(range(n), 0)
    for m in received:
        up[m.sender] += wire_size(m)
    replies: list[Roster | ShareInbox] = [*rosters.values(), *inboxes.values()]
    for reply in replies:
        down[reply.receiver] += wire_size(reply)
    for u in request.survivors:
        down[u] += wire_size(request)
    return SecureSumResult(
        total=total,
        included=result.included,
        error_bound=sum_error_bound(fp, len(result.included)),
        graph=g,
        threshold=t,
        max_bytes_up=max(up.values()),
        max_bytes_down=max(down.values()),
        client_seconds=tc,
        server_seconds=ts,
        server_received=tuple(received),
    )
