"""Secure aggregation in deployment: the server relays the four SecAgg rounds (no grpc here).

With ``secagg.enabled`` a client that has trained never uploads its update. It
turns it into ``flatten_weighted(update, max_weight=W)`` (W = ``secagg.max_weight``,
public), encodes it in the fixed-point ring and runs the client state machine of
:mod:`fedloom.secagg.client`, one ``SecAgg`` RPC per stage::

    stage 0  AdvertiseKeys (+ the update's metadata)  ->  Roster
    stage 1  ShareKeys                                 ->  ShareInbox
    stage 2  MaskedInput                               ->  UnmaskRequest
    stage 3  UnmaskResponse                            ->  (empty: done)

Each call blocks in :meth:`SecureRelay.exchange` until the round loop, in
:meth:`SecureRelay.run`, closes the stage -- when every client expected at it
has answered, or at its deadline (the round deadline for stage 0, then
``stage_timeout_s`` per stage) -- runs the matching step of
:mod:`fedloom.secagg.server` and publishes one reply per client still in the
round. A client missing at a stage is a dropout; the state machines recover
the sum as long as every needed secret keeps ``threshold`` holders, otherwise
:meth:`run` raises :class:`~fedloom.secagg.errors.SecAggAbort` and the round
attempt is aborted like one below quorum.

Notes
-----
Threat model: the server receives public keys, sealed shares it cannot open,
masked vectors and, from honest clients, at most one kind of share per owner;
it unmasks only the sum (see :mod:`fedloom.secagg.server`). The update's
metadata -- weight, example and step counts, train loss, compute seconds --
travels in the clear at stage 0, as for a plain upload, for the round's
metrics; the weight used in the aggregate is summed under the masks. Per-update
server checks (norm bounds, ``pipeline.decode``) cannot run: clipping is
trusted to the clients. Nothing of a secure round is written to the pending
table, so a server restarted mid-round reruns that round from scratch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from fedloom.core.errors import ConfigError, FedloomError, UpdateError
from fedloom.net.wire import UpdateMeta, decode_secagg, encode_secagg
from fedloom.secagg import server
from fedloom.secagg.errors import SecAggAbort
from fedloom.secagg.fixedpoint import FixedPoint, decode_sum, sum_error_bound
from fedloom.secagg.graph import Graph, default_threshold
from fedloom.secagg.messages import (
    AdvertiseKeys,
    MaskedInput,
    RoundParams,
    ShareKeys,
    UnmaskResponse,
)

__all__ = ["STAGES", "SecureOutcome", "SecureParams", "SecureRelay"]

STAGES = ("advertise keys", "share keys", "masked input", "unmask")
_KINDS: tuple[type, ...] = (AdvertiseKeys, ShareKeys, MaskedInput, UnmaskResponse)


@dataclass(frozen=True)
class SecureParams:
    """The public parameters of one secure round attempt (``TaskReply.secagg_json``).

    ``session`` is fresh per attempt; ``length`` = model elements + 1 (the weight);
    ``max_clients`` bounds the fixed-point headroom (the cohort size).
    """

    session: bytes
    threshold: int
    bits: int
    length: int
    clip: float
    max_weight: float
    max_clients: int
    # compression.codec = "qsgd": the clients round stochastically onto a ring of width
    # bits = ring_bits(quant_bits, max_clients) with a power-of-two scale (fedloom.transforms.compression.ring).
    quant_bits: int = 0

    def round_params(self) -> RoundParams:
        return RoundParams(session=self.session, threshold=self.threshold, bits=self.bits, length=self.length)

    def fixed_point(self) -> FixedPoint:
        return FixedPoint(self.clip, bits=self.bits, max_clients=self.max_clients, pow2=self.quant_bits > 0)

    def to_json(self) -> str:
        return json.dumps({**dataclasses.asdict(self), "session": self.session.hex()})

    @classmethod
    def from_json(cls, text: str) -> SecureParams:
        """Inverse of :meth:`to_json`; raises :class:`UpdateError` on malformed text."""
        try:
            raw = json.loads(text)
            return cls(
                session=bytes.fromhex(raw["session"]),
                threshold=int(raw["threshold"]),
                bits=int(raw["bits"]),
                length=int(raw["length"]),
                clip=float(raw["clip"]),
                max_weight=float(raw["max_weight"]),
                max_clients=int(raw["max_clients"]),
                quant_bits=int(raw.get("quant_bits", 0)),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise UpdateError(f"bad secure-aggregation parameters: {exc}") from None

    @classmethod
    def fresh(
        cls,
        graph: Graph,
        *,
        threshold: int,
        bits: int,
        length: int,
        clip: float,
        max_weight: float,
        quant_bits: int = 0,
    ) -> SecureParams:
        """New parameters for ``graph`` (``threshold`` 0 = the default for its largest group).

        ``quant_bits > 0`` replaces ``bits`` with the ring width for that many bits per client
        and this cohort size (:func:`~fedloom.transforms.compression.ring.ring_bits`).
        """
        if quant_bits:
            from fedloom.transforms.compression.ring import ring_bits

            bits = ring_bits(quant_bits, len(graph.ids))
        group = graph.max_degree() + 1
        t = threshold or default_threshold(group)
        if not group / 2 < t <= group:
            raise ConfigError(
                [f"secagg.threshold must be in ({group / 2}, {group}] for groups of {group}, got {t}"]
            )
        return cls(os.urandom(16), t, bits, length, clip, max_weight, len(graph.ids), quant_bits)


@dataclass(frozen=True)
class SecureOutcome:
    """A completed secure round: ``total`` ~ ``sum_{u in included} flatten_weighted(x_u)``."""

    total: NDArray[np.float64]
    included: tuple[int, ...]
    metas: dict[int, UpdateMeta]  # stage-0 metadata of the included clients
    error_bound: float
    # the attempt's traffic: each client's messages taken in (every stage) and all replies sent
    bytes_up: dict[int, int] = field(default_factory=dict)
    bytes_down: int = 0


class SecureRelay:
    """One secure round attempt over a cohort ``graph``: the server's worker threads call :meth:`exchange`,
    the round loop calls :meth:`run` once. Never calls out while holding its lock."""

    def __init__(
        self, params: SecureParams, graph: Graph, *, target: int, deadline: float, stage_timeout_s: float
    ) -> None:
        self.params, self.graph = params, graph
        self._target, self._deadline, self._stage_timeout = target, deadline, stage_timeout_s
        self._cond = threading.Condition()
        self._inbox: list[dict[int, object]] = [{} for _ in STAGES]
        self._replies: list[dict[int, bytes] | None] = [None for _ in STAGES]
        self._expected: set[int] = set(graph.ids)
        self._open: int | None = 0
        self._failed: set[int] = set()
        self._entered: set[int] = set()  # tried stage 0, even if refused: no second training
        self._metas: dict[int, UpdateMeta] = {}
        self._abort: str | None = None
        self._bytes_up: dict[int, int] = {}
        self._bytes_down = 0

    # ---- RPC side -----------------------------------------------------------
    def joined(self, cid: int) -> bool:
        """True once ``cid`` has entered this attempt (or reported that it could not train)."""
        with self._cond:
            return cid in self._entered or cid in self._failed

    def note_failure(self, cid: int) -> None:
        with self._cond:
            self._failed.add(cid)
            self._cond.notify_all()

    def exchange(self, cid: int, stage: int, payload: bytes, meta_json: str = "") -> tuple[bytes, str]:
        """Hand in ``cid``'s message for ``stage``; block until the stage closes: (reply, "") or (b"", why not)."""
        if not 0 <= stage < len(STAGES):
            return b"", f"no secure-aggregation stage {stage}"
        if stage == 0:
            with self._cond:
                self._entered.add(cid)
        try:
            message: object = decode_secagg(payload, _KINDS[stage])
            if getattr(message, "sender", None) != cid:
                raise UpdateError(
                    f"message names sender {getattr(message, 'sender', None)}, not client {cid}"
                )
            meta = UpdateMeta.from_json(meta_json) if stage == 0 else None
            if meta is not None and meta.weight > self.params.max_weight:
                raise UpdateError(
                    f"weight {meta.weight} exceeds secagg.max_weight = {self.params.max_weight}"
                )
        except FedloomError as exc:
            return b"", f"{STAGES[stage]}: {exc}"
        with self._cond:
            if self._abort is not None:
                return b"", self._abort
            if self._open != stage:
                return b"", f"{STAGES[stage]}: that stage is not open"
            if cid not in self._expected or cid in self._inbox[stage]:
                return (
                    b"",
                    f"{STAGES[stage]}: client {cid} is not expected (dropped, duplicate or not selected)",
                )
            self._inbox[stage][cid] = message
            self._bytes_up[cid] = self._bytes_up.get(cid, 0) + len(payload)
            if meta is not None:
                self._metas[cid] = meta
            self._cond.notify_all()
            while self._replies[stage] is None and self._abort is None:
                self._cond.wait()
            replies = self._replies[stage]
            if replies is None:
                return b"", self._abort or "aborted"
            if cid not in replies:
                return b"", f"{STAGES[stage]}: client {cid} was dropped from the round"
            return replies[cid], ""

    # ---- round loop side -------------------------------------------------------
    def abort(self, reason: str) -> None:
        with self._cond:
            if self._abort is None:
                self._abort = reason
            self._open = None
            self._cond.notify_all()

    def _close(self, stage: int, deadline: float) -> list[object]:
        """Wait until every expected client has answered ``stage`` (stage 0: or ``target`` did), then close it."""
        with self._cond:
            while True:
                got = self._inbox[stage]
                if stage == 0:
                    done = len(got) >= self._target or len(got) + len(self._failed - set(got)) >= len(
                        self._expected
                    )
                else:
                    done = len(got) >= len(self._expected)
                left = deadline - time.monotonic()
                if done or left <= 0:
                    break
                self._cond.wait(timeout=left)
            self._open = None
            return [got[c] for c in sorted(got)]

    def _publish(self, stage: int, replies: dict[int, bytes]) -> None:
        with self._cond:
            self._replies[stage] = replies
            self._bytes_down += sum(len(r) for r in replies.values())
            self._expected = set(replies)
            self._open = stage + 1 if stage + 1 < len(STAGES) else None
            self._cond.notify_all()

    def run(self) -> SecureOutcome:
        """Drive the four stages; raises :class:`SecAggError` (after telling every waiting client) on abort."""
        try:
            return self._run()
        except BaseException as exc:  # never leave a worker thread waiting on a stage
            self.abort(f"secure aggregation aborted: {exc}")
            raise

    def _run(self) -> SecureOutcome:
        p = self.params
        adverts = [m for m in self._close(0, self._deadline) if isinstance(m, AdvertiseKeys)]
        keys, rosters = server.collect_keys(p.round_params(), self.graph, adverts)
        self._publish(0, {u: encode_secagg(r) for u, r in rosters.items()})
        shares = [m for m in self._close(1, self._next_deadline()) if isinstance(m, ShareKeys)]
        sharing, inboxes = server.route_shares(keys, shares)
        self._publish(1, {u: encode_secagg(b) for u, b in inboxes.items()})
        masked = [m for m in self._close(2, self._next_deadline()) if isinstance(m, MaskedInput)]
        masked_state, request = server.collect_masked(sharing, masked)
        self._publish(2, {u: encode_secagg(request) for u in request.survivors})
        responses = [m for m in self._close(3, self._next_deadline()) if isinstance(m, UnmaskResponse)]
        result = server.unmask(masked_state, responses)
        self._publish(3, {r.sender: b"" for r in responses})
        fp = p.fixed_point()
        total = decode_sum(result.encoded, fp, num_clients=len(result.included))
        with self._cond:  # every stage is closed and published: the counts are final
            metas = {c: self._metas[c] for c in result.included}
            up, down = dict(self._bytes_up), self._bytes_down
        if not result.included:
            raise SecAggAbort("unmask: no client's input is in the sum", needed=1, available=0)
        bound = sum_error_bound(fp, len(result.included))
        return SecureOutcome(total, result.included, metas, bound, bytes_up=up, bytes_down=down)

    def _next_deadline(self) -> float:
        return time.monotonic() + self._stage_timeout


def cohort_graph(kind: str, cohort: Sequence[int], degree: int, rng: np.random.Generator) -> Graph:
    """The SecAgg graph over the selected ``cohort`` ('complete' or 'harary' of ``degree``, 0 = default)."""
    from fedloom.secagg.graph import complete_graph, harary_graph, secagg_plus_degree

    if kind != "harary":
        return complete_graph(list(cohort))
    return harary_graph(list(cohort), degree or secagg_plus_degree(len(cohort)), rng)
