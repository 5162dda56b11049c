"""Round bookkeeping and update validation for the deployed server (no grpc here).

The server's round loop opens a round (:meth:`Coordinator.open_round`), the RPC
handlers hand in updates (:meth:`Coordinator.submit`; in the server they all run
on one event-loop thread, see :mod:`fedloom.net.server`, but the class is
thread-safe), and the round loop blocks in :meth:`Coordinator.wait_close` until
the round closes:

* as soon as ``target`` updates are accepted (the cohort size; with over-selection
  more clients were asked than needed), or
* once every selected client has answered (accepted or reported a failure), or
* at the deadline.

Every incoming update is validated before it counts: the round it names (an
older round is *late* if its sender was selected then, else a *replay*; a future
round is refused), the sender's selection, duplicates, the broadcast it was
trained on, that it parses, names/shapes/dtypes against the global model, what
the algorithm requires of an update (its extras, a least step count: see
:mod:`fedloom.algorithms.requirements`), finiteness, a squared L2 norm that
float32 can hold (below :data:`~fedloom.net.guard.OVERFLOW_SQUARE`, whatever the configured bound),
the configured norm bound, the weight cap (``deploy.max_weight``), and the
pipeline's own ``decode`` checks (a packed update, from a codec stage, is unpacked first, so
these checks see the delta it stands for). Under ``deploy.weighting = "uniform"`` every
accepted update then gets weight 1. A rejected update gets its reason back, a log
line and an audit row; nothing already accepted is touched. Any exception raised
while checking one update rejects that update, never more. Accepted updates are
written to the ``pending`` table before the client hears "accepted", so a killed
server loses none; the pending updates restored after a restart pass the same
checks, and one that fails is rejected and its row dropped.

Each selected client has one outcome per round attempt: an accepted update or a
failure report, whichever came first; a second is refused.

Under secure aggregation (``open_round(..., relay=...)``, see :mod:`fedloom.net.secure`)
plaintext uploads are refused outright -- nothing is staged or stored -- and selected
clients take part through :meth:`Coordinator.secure_exchange`; the round loop drives
the relay and closes the attempt with :meth:`Coordinator.close_secure`.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedloom.algorithms.api import Broadcast, ClientUpdate, ServerContext
from fedloom.algorithms.requirements import UNDECLARED, UpdateRequirements, check_update
from fedloom.core.errors import FedloomError, UpdateError
from fedloom.core.params import Params
from fedloom.core.serde import data_all_finite, data_square_sum
from fedloom.net.guard import OVERFLOW_SQUARE, square_norm
from fedloom.net.logs import JsonLog
from fedloom.net.state import NetState, PendingUpdate, blob_checksum
from fedloom.net.timing import RoundTiming
from fedloom.net.wire import decode_update, fingerprint
from fedloom.transforms.adaptive_clip import bind_pipeline
from fedloom.transforms.pipeline import Pipeline, bind_model, packs

if TYPE_CHECKING:  # fedloom.net.secure needs the optional 'secure' extra
    from fedloom.net.secure import SecureOutcome, SecureRelay

__all__ = ["Closed", "Coordinator", "Task"]

#: Reasons, failure reports and names written to the audit table and the log are cut to this length.
MAX_REASON = 500


@dataclass(frozen=True)
class Task:
    """The answer to a client's GetTask: ``kind`` is "wait", "train" or "done"."""

    kind: str
    round: int = 0
    digest: str = ""
    size: int = 0
    xxh3: int = 0
    deadline_in_s: float = 0.0
    secagg_json: str = ""
    message: str = ""


@dataclass(frozen=True)
class Closed:
    """What a closed round attempt produced (updates sorted by client id; none under SecAgg).

    ``secure`` is the secure sum of a secure round that completed, else ``None``.
    """

    updates: list[ClientUpdate]
    compute_s: dict[int, float]
    failed: dict[int, str]
    dropouts: list[int]
    timing: dict[str, float] = field(default_factory=dict)
    secure: SecureOutcome | None = None


@dataclass
class _Round:
    number: int
    attempt: int
    selected: frozenset[int]
    target: int
    deadline: float
    broadcast: Broadcast
    blob: bytes
    digest: str
    ctx: ServerContext
    pipeline: Pipeline
    xxh3: int = 0
    accepted: dict[int, ClientUpdate] = field(default_factory=dict)
    compute_s: dict[int, float] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    open: bool = True
    timing: RoundTiming = field(default_factory=RoundTiming)
    relay: SecureRelay | None = None

    def answered(self) -> bool:
        """Enough answers to close: the target of accepted updates, or every selected client heard."""
        return len(self.accepted) >= self.target or len(self.accepted) + len(self.failed) >= len(
            self.selected
        )


class Coordinator:
    """Shared state between the round loop and the RPC handlers (one lock, one condition)."""

    def __init__(
        self,
        names: Sequence[str],
        state: NetState,
        pipeline: Pipeline,
        log: JsonLog,
        *,
        max_update_norm: float = 0.0,
        offline_after_s: float = 20.0,
        requirements: UpdateRequirements = UNDECLARED,
        max_weight: float = 0.0,
        weighting: str = "reported",
    ) -> None:
        """``requirements``: what the algorithm's updates carry; ``max_weight``: the largest weight an
        update may report (0 = any); ``weighting``: ``"reported"`` or ``"uniform"`` (weight 1 each)."""
        if weighting not in ("reported", "uniform"):
            raise ValueError(f"weighting must be 'reported' or 'uniform', got {weighting!r}")
        self.names = list(names)
        self._requirements = requirements
        self._max_weight = max_weight
        self._uniform = weighting == "uniform"
        self._ids = {n: i for i, n in enumerate(self.names)}
        self._state = state
        self._pipeline = pipeline
        self._packed = any(packs(s) for s in pipeline.stages)
        self._log = log
        self._max_norm = max_update_norm
        self._offline_after = offline_after_s
        # One lock; the round loop waits on ``_cond`` (answers arriving). Long-polling GetTask
        # handlers are told of a round opening, or the run ending, by the watchers
        # (see :meth:`watch_tasks`); waking every parked poller on every accepted update made a
        # round cost O(clients^2) wake-ups.
        self._cond = threading.Condition(threading.RLock())
        self._task_watchers: list[Callable[[], None]] = []
        # Received updates are decoded, validated and staged one at a time. The server calls
        # ``submit`` from its one event-loop thread, where this lock is never contended; callers
        # on several threads (tests, embedders) are queued by it. When the server still ran one
        # handler thread per call, letting them all run this CPU-bound Python at once made them
        # fight over the GIL: with the lock the server used 10-20% less CPU per round.
        self._ingest = threading.Lock()
        self._round: _Round | None = None
        self._previous_selected: dict[int, frozenset[int]] = {}
        self._last_seen: dict[int, float] = {}
        self._done = False
        self._stopping = ""
        self._told_done: set[int] = set()
        self.rejections: Counter[str] = Counter()
        self.last_metrics: Mapping[str, Any] = {}
        self.completed_round = 0

    # ---- identity and liveness -------------------------------------------
    def client_id(self, name: str) -> int | None:
        return self._ids.get(name)

    def touch(self, cid: int) -> None:
        with self._cond:
            self._last_seen[cid] = time.monotonic()

    def online(self) -> list[int]:
        now = time.monotonic()
        with self._cond:
            return sorted(c for c, t in self._last_seen.items() if now - t <= self._offline_after)

    # ---- round loop side -------------------------------------------------
    def open_round(
        self,
        broadcast: Broadcast,
        blob: bytes,
        digest: str,
        *,
        attempt: int,
        selected: Sequence[int],
        target: int,
        deadline_s: float,
        ctx: ServerContext,
        pending: Sequence[PendingUpdate] = (),
        algo_state: Mapping[str, Params] | None = None,
        relay: SecureRelay | None = None,
    ) -> None:
        """Open round ``broadcast.round`` for ``selected``; ``pending`` were accepted before a restart.

        ``algo_state`` binds stateful pipeline stages (adaptive clipping) for this round's decode;
        ``relay`` makes it a secure round (no uploads; ``pending`` must be empty).
        """
        round_pipeline = bind_model(bind_pipeline(self._pipeline, algo_state or {}), broadcast.params)
        rnd = _Round(
            number=broadcast.round,
            attempt=attempt,
            selected=frozenset(selected),
            target=target,
            deadline=time.monotonic() + deadline_s,
            broadcast=broadcast,
            blob=blob,
            digest=digest,
            ctx=ctx,
            pipeline=round_pipeline,
            relay=relay,
            xxh3=fingerprint(blob),
        )
        restored = 0
        for p in pending:
            try:
                update, compute = decode_update(p.client_id, p.meta_json, p.blob)
                update = self._validate(round_pipeline.unpack(update, ctx), rnd, *self._blob_pass(p.blob))
                rnd.accepted[p.client_id] = round_pipeline.decode_unpacked(update, ctx)
                rnd.compute_s[p.client_id] = compute
                restored += 1
            except Exception as exc:  # one bad row is that update's rejection, never the round's end
                self._state.drop_pending(rnd.number, p.client_id)
                self.reject(p.client_id, rnd.number, len(p.blob), "restored update: " + _reason(exc))
        with self._cond:
            self._round = rnd
            self._previous_selected[rnd.number] = rnd.selected
            self._cond.notify_all()
            self._tasks_changed()
        self._log(
            "round_open",
            round=rnd.number,
            attempt=attempt,
            selected=[self.names[c] for c in sorted(rnd.selected)],
            target=target,
            deadline_s=deadline_s,
            restored=restored,
        )

    def wait_close(self) -> Closed:
        """Block until the open round closes (see the module docstring); late updates are refused after."""
        with self._cond:
            rnd = self._round
            if rnd is None:
                raise RuntimeError("wait_close() without an open round")
            while not rnd.answered():
                left = rnd.deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(timeout=left)
            rnd.open = False
            rnd.timing.closed = time.perf_counter()
            # Only selected clients without an accepted update can still send a *late* one;
            # anything else for this round is a replay.
            self._previous_selected[rnd.number] = rnd.selected - set(rnd.accepted)
            for old in [r for r in self._previous_selected if r < rnd.number - 2]:
                del self._previous_selected[old]
            updates = [rnd.accepted[c] for c in sorted(rnd.accepted)]
            dropouts = sorted(rnd.selected - set(rnd.accepted) - set(rnd.failed))
        for c in dropouts:
            self._state.audit(rnd.number, c, self.names[c], "dropout", 0, f"attempt {rnd.attempt}")
        return Closed(updates, dict(rnd.compute_s), dict(rnd.failed), dropouts, rnd.timing.summary())

    def close_secure(self, outcome: SecureOutcome | None) -> Closed:
        """Close the open secure round attempt; ``outcome`` is the relay's result (``None``: it aborted)."""
        included = set(outcome.included) if outcome is not None else set()
        with self._cond:
            rnd = self._round
            if rnd is None or rnd.relay is None:
                raise RuntimeError("close_secure() without an open secure round")
            rnd.open = False
            rnd.timing.closed = time.perf_counter()
            self._previous_selected[rnd.number] = rnd.selected - included
            for old in [r for r in self._previous_selected if r < rnd.number - 2]:
                del self._previous_selected[old]
            dropouts = sorted(rnd.selected - included - set(rnd.failed))
        for c in dropouts:
            self._state.audit(rnd.number, c, self.names[c], "dropout", 0, f"attempt {rnd.attempt}")
        compute = {c: m.compute_s for c, m in outcome.metas.items()} if outcome is not None else {}
        return Closed([], compute, dict(rnd.failed), dropouts, rnd.timing.summary(), secure=outcome)

    def refuses_plaintext(self) -> bool:
        """True while a secure round is open: an upload is refused before its blob is read."""
        with self._cond:
            return self._round is not None and self._round.relay is not None

    def secure_exchange(
        self, cid: int, round: int, stage: int, payload: bytes, meta_json: str, session: str
    ) -> tuple[bytes, str]:
        """One SecAgg stage for ``cid`` (blocks until the stage closes): (reply, "") or (b"", reason)."""
        with self._cond:
            rnd = self._round
            ok = (
                rnd is not None
                and rnd.open
                and rnd.relay is not None
                and rnd.number == round
                and cid in rnd.selected
                and rnd.relay.params.session.hex() == session
            )
            relay = rnd.relay if rnd is not None and ok else None
        if relay is None:
            reply, why = b"", f"no secure round {round} is open for this client (session {session[:8]})"
        else:
            reply, why = relay.exchange(cid, stage, payload, meta_json)
        if why:
            self.reject(cid, round, len(payload), why, event="secagg_refused")
        elif stage == 2:
            self._state.audit(round, cid, self.names[cid], "secagg_masked", len(payload), "masked input")
        return reply, why

    def finish(self, metrics: Mapping[str, Any]) -> None:
        with self._cond:
            self.last_metrics = dict(metrics)
            self.completed_round = int(metrics.get("round", 0))

    def set_done(self) -> None:
        with self._cond:
            self._done = True
            self._round = None
            self._cond.notify_all()
            self._tasks_changed()

    def set_stopping(self, reason: str) -> None:
        """The server stops without finishing the run (it can be restarted to resume): no round is
        open, and clients are told to wait, with ``reason``, not that the run is done."""
        with self._cond:
            self._stopping = reason
            self._round = None
            self._cond.notify_all()
            self._tasks_changed()

    def everyone_told_done(self) -> bool:
        """True once every client online at the end has been answered DONE."""
        return set(self.online()) <= self._told_done

    # ---- RPC side ----------------------------------------------------------
    def task_now(self, cid: int) -> Task | None:
        """``cid``'s task if there is one now ("train" or "done"), else ``None`` (it should wait).

        Never blocks: the server's long-poll waits for :meth:`watch_tasks` to fire between tries.
        """
        with self._cond:
            self._last_seen[cid] = time.monotonic()
            if self._done:
                self._told_done.add(cid)
                return Task("done")
            if self._stopping:
                return Task("wait", message=self._stopping)
            rnd = self._round
            if (
                rnd is None
                or not rnd.open
                or cid not in rnd.selected
                or cid in rnd.accepted
                or cid in rnd.failed
                or (rnd.relay is not None and rnd.relay.joined(cid))
            ):
                return None
            return Task(
                "train",
                round=rnd.number,
                digest=rnd.digest,
                size=len(rnd.blob),
                xxh3=rnd.xxh3,
                # in whole tenths, rounded down: the replies of one round's clients are
                # then mostly byte-identical and the server encodes the reply once
                deadline_in_s=max(0.0, math.floor(10 * (rnd.deadline - time.monotonic())) / 10),
                secagg_json=rnd.relay.params.to_json() if rnd.relay is not None else "",
            )

    def watch_tasks(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (with the lock held: it must not block) whenever a client may have got a
        task: a round opening, the run ending. (A round closing only takes tasks away.)"""
        with self._cond:
            self._task_watchers.append(callback)

    def _tasks_changed(self) -> None:
        for callback in self._task_watchers:
            callback()

    def broadcast_blob(self, round: int, digest: str) -> bytes | None:
        with self._cond:
            rnd = self._round
            if rnd is None or rnd.number != round or rnd.digest != digest:
                return None
            return rnd.blob

    def note_download(self, round: int, start: float, end: float) -> None:
        """Record that a Download of ``round``'s broadcast took ``start`` .. ``end`` (perf_counter)."""
        with self._cond:
            if self._round is not None and self._round.number == round:
                self._round.timing.add_download(start, end)

    def upload_limit(self, configured: int) -> int:
        """Largest upload accepted now: ``configured`` or 2 x the broadcast + 64 KiB.

        The broadcast counts at full precision: under ``compression.downlink`` its blob is
        smaller than the float32 update a client may still send.
        """
        if configured > 0:
            return configured
        with self._cond:
            rnd = self._round
            size = 0
            if rnd is not None:
                full = rnd.broadcast.params.num_bytes() + sum(
                    p.num_bytes() for p in rnd.broadcast.extras.values()
                )
                size = max(len(rnd.blob), full)
        return 2 * size + 65536

    def reject(self, cid: int, round: int, nbytes: int, reason: str, *, event: str = "rejected") -> str:
        reason = _cut(reason)
        self.rejections[event] += 1
        name = self.names[cid] if 0 <= cid < len(self.names) else "?"
        self._state.audit(round, cid, name, event, nbytes, reason)
        self._log("update_" + event, level="warning", client=name, round=round, bytes=nbytes, reason=reason)
        return reason

    def report_failure(self, cid: int, round: int, reason: str) -> str | None:
        """A client could not train (e.g. diverged); counts as its answer for the round."""
        reason = _cut(reason)
        with self._cond:
            rnd = self._round
            if rnd is None or not rnd.open or rnd.number != round or cid not in rnd.selected:
                return self.reject(cid, round, 0, f"failure report for round {round} is not current")
            if cid in rnd.accepted or cid in rnd.failed:
                answered = "an accepted update" if cid in rnd.accepted else "a failure report"
                return self.reject(
                    cid,
                    round,
                    0,
                    f"failure report from client {self.names[cid]!r} for round {round}: it already sent "
                    f"{answered} (one outcome per client and round)",
                )
            rnd.failed[cid] = reason
            relay = rnd.relay
            if rnd.answered():  # the round loop waits for this (or the deadline) alone
                self._cond.notify_all()
        if relay is not None:
            relay.note_failure(cid)
        self._state.audit(round, cid, self.names[cid], "failed", 0, reason)
        self._log("client_failed", level="warning", client=self.names[cid], round=round, reason=reason)
        return None

    def _check_slot(self, cid: int, round: int, digest: str) -> str | None:
        """Why an update from ``cid`` for ``round`` cannot be taken now (None = it can); lock held."""
        rnd = self._round
        current = rnd.number if rnd is not None else self.completed_round + 1
        if rnd is not None and round == rnd.number and cid in rnd.accepted:
            return f"duplicate submission: client {self.names[cid]!r} already contributed to round {round}"
        if rnd is None or round < current or (round == current and not rnd.open):
            if round >= current - 1 and cid in self._previous_selected.get(round, frozenset()):
                return "late"
            return f"update for round {round}, which is closed (replayed or stale update)"
        if round > current:
            return f"update for round {round}, but round {current} is open (not yet started)"
        if cid not in rnd.selected:
            return f"client {self.names[cid]!r} is not selected for round {round}"
        if digest != rnd.digest:
            return f"update was trained on another model (digest {digest[:12]}), not round {round}'s"
        if rnd.relay is not None:
            return f"secure aggregation is on: plaintext updates are refused (round {round})"
        if cid in rnd.failed:
            return (
                f"client {self.names[cid]!r} already reported a failure for round {round} "
                "(one outcome per client and round)"
            )
        return None

    def submit(
        self,
        cid: int,
        round: int,
        digest: str,
        meta_json: str,
        blob: bytes | memoryview,
        *,
        received_s: float = 0.0,
    ) -> str | None:
        """Validate and record one update; returns the rejection reason, or ``None`` if accepted.

        ``received_s`` is how long the upload stream took to arrive (for the round's timing).
        Updates are taken one at a time (the blob has already arrived: a slow upload holds nothing).
        """
        arrived = time.perf_counter()
        checksum = blob_checksum(blob)
        with self._ingest:
            err = self._take(cid, round, digest, meta_json, blob, received_s, arrived, checksum)
        if err is None:  # logged after the queue: the next update need not wait for the write
            self._log("update_accepted", client=self.names[cid], round=round, bytes=len(blob))
        return err

    def _take(
        self,
        cid: int,
        round: int,
        digest: str,
        meta_json: str,
        blob: bytes | memoryview,
        received_s: float,
        arrived: float,
        checksum: str,
    ) -> str | None:
        with self._cond:
            why = self._check_slot(cid, round, digest)
            rnd = self._round
        if why == "late":
            return self.reject(
                cid, round, len(blob), f"late update for round {round}: the round had closed", event="late"
            )
        if why is not None or rnd is None:
            return self.reject(cid, round, len(blob), why or "no round is open")
        # The blob goes to its slot file first, and is decoded from there: where the slot is kept
        # mapped (see NetState.view) its tensors are views of the page cache, with no copy of
        # their own. They are valid while the slot is named by this update's row, i.e. until the
        # round's checkpoint is committed (the parallel executor's deltas have the same lifetime:
        # a round). The blob is written outside the round lock (GetTask, status and the round loop
        # go on meanwhile); only the small row that makes it count is committed under it, before
        # the client hears "accepted".
        t_store = time.perf_counter()
        try:
            staged = self._state.stage(round, cid, blob, checksum=checksum)
        except FedloomError as exc:  # the server's disk, not the update: refused, the run goes on
            self._log("store_failed", level="error", client=self.names[cid], round=round, reason=str(exc))
            return self.reject(cid, round, len(blob), str(exc))
        t_validate = time.perf_counter()
        mapped = self._state.view(staged)
        try:
            held = blob if mapped is None else mapped
            update, compute = decode_update(cid, meta_json, held, copy=mapped is None)
            # A packed update (a codec) is unpacked first: the checks see the delta it stands for.
            update = self._validate(rnd.pipeline.unpack(update, rnd.ctx), rnd, *self._blob_pass(held))
            decoded = rnd.pipeline.decode_unpacked(update, rnd.ctx)
        except Exception as exc:  # whatever breaks on one update rejects it and frees its slot
            self._state.discard(staged)
            return self.reject(cid, round, len(blob), _reason(exc))
        t_record = time.perf_counter()
        with self._cond:
            why = self._check_slot(cid, round, digest)  # the round may have closed meanwhile
            if why is None and self._round is not rnd:
                why = "late"  # the attempt it was validated against closed and a new one opened
            if why is None:
                self._state.record_pending(staged, self.names[cid], meta_json, f"attempt {rnd.attempt}")
                rnd.accepted[cid] = decoded
                rnd.compute_s[cid] = compute
                end = time.perf_counter()
                store_s = (t_validate - t_store) + (end - t_record)
                rnd.timing.add_upload(received_s, arrived, t_record - t_validate, store_s, end)
                if rnd.answered():  # not on every update: each wake-up took the GIL from the ingest
                    self._cond.notify_all()
        if why is not None:
            self._state.discard(staged)
            event = "late" if why == "late" else "rejected"
            return self.reject(cid, round, len(blob), why if why != "late" else "late update", event=event)
        return None

    def _blob_pass(self, blob: bytes | memoryview) -> tuple[bool | None, float | None]:
        """:func:`_one_pass` over a plain update's blob; nothing for a packed one (its codes are no delta)."""
        if self._packed:
            return None, None
        return _one_pass(blob)

    def _validate(
        self, update: ClientUpdate, rnd: _Round, finite: bool | None = None, square: float | None = None
    ) -> ClientUpdate:
        """``update`` as it takes part (reweighted under uniform weighting), or raise
        :class:`UpdateError` naming what is wrong with it.

        ``finite``: the blob's one-pass finiteness (see :func:`~fedloom.core.serde.data_all_finite`),
        ``True`` skips the per-tensor checks, which otherwise name the tensor that is not finite;
        ``square``: the blob's one-pass sum of squares (:func:`~fedloom.core.serde.data_square_sum`;
        ``None``: summed here, tensor by tensor).
        """
        client = self.names[update.client_id]
        rnd.broadcast.params.check_compatible(update.delta, what="update delta")
        check_update(self._requirements, update, rnd.broadcast.params, client=client, round=rnd.number)
        if finite is not True and not update.delta.all_finite():
            raise UpdateError("update delta contains NaN or infinite values")
        for name, extra in update.extras.items():
            if finite is not True and not extra.all_finite():
                raise UpdateError(f"update extra {name!r} contains NaN or infinite values")
            if set(extra) <= set(rnd.broadcast.params):
                for k, v in extra.items():
                    ref = rnd.broadcast.params[k]
                    if v.shape != ref.shape or v.dtype != ref.dtype:
                        raise UpdateError(
                            f"update extra {name!r} parameter {k!r} has shape {tuple(v.shape)} "
                            f"{v.dtype}, expected {tuple(ref.shape)} {ref.dtype}"
                        )
        if square is None:
            square = square_norm([update.delta, *update.extras.values()])
        if not square < OVERFLOW_SQUARE:
            raise UpdateError(
                f"update from client {client!r} for round {rnd.number}: its squared L2 norm overflows "
                f"float32 (norm >= {math.sqrt(OVERFLOW_SQUARE):.3g}); refused whatever the configured bound"
            )
        if self._max_norm > 0:
            norm = update.delta.l2_norm()
            if norm > self._max_norm:
                raise UpdateError(
                    f"update norm {norm:.6g} exceeds the bound deploy.max_update_norm = {self._max_norm}"
                )
        if self._max_weight > 0 and update.weight > self._max_weight:
            raise UpdateError(
                f"update from client {client!r} for round {rnd.number}: weight {update.weight:.6g} exceeds "
                f"deploy.max_weight = {self._max_weight:g}"
            )
        if self._uniform and update.weight != 1.0:
            update = dataclasses.replace(update, weight=1.0)
        return update

    # ---- operator view -----------------------------------------------------
    def status(self, extra: Mapping[str, Any]) -> dict[str, Any]:
        now = time.monotonic()
        with self._cond:
            rnd = self._round
            clients = [
                {
                    "name": n,
                    "id": i,
                    "online": i in self._last_seen and now - self._last_seen[i] <= self._offline_after,
                    "last_seen_s_ago": round(now - self._last_seen[i], 1) if i in self._last_seen else None,
                }
                for i, n in enumerate(self.names)
            ]
            current: dict[str, Any] = {}
            if rnd is not None:
                current = {
                    "round": rnd.number,
                    "attempt": rnd.attempt,
                    "open": rnd.open,
                    "selected": [self.names[c] for c in sorted(rnd.selected)],
                    "accepted": [self.names[c] for c in sorted(rnd.accepted)],
                    "deadline_in_s": round(max(0.0, rnd.deadline - now), 1),
                }
            return {
                **extra,
                "done": self._done,
                "completed_round": self.completed_round,
                "current": current,
                "clients": clients,
                "last_metrics": dict(self.last_metrics),
                "rejections": dict(self.rejections),
            }


def _one_pass(blob: bytes | memoryview) -> tuple[bool | None, float | None]:
    """The blob's finiteness and sum of squares for :meth:`Coordinator._validate`, in one pass over
    its data when it can: a sum of squares below :data:`OVERFLOW_SQUARE` has no NaN or infinity in it.
    """
    square = data_square_sum(blob)
    if square is not None and square < OVERFLOW_SQUARE:
        return True, square
    return data_all_finite(blob), square


def _cut(text: str) -> str:
    """``text`` cut to :data:`MAX_REASON` characters (what a caller sends is never stored unbounded)."""
    return text if len(text) <= MAX_REASON else f"{text[:MAX_REASON]}... ({len(text)} characters)"


def _reason(exc: BaseException) -> str:
    """The rejection reason for an exception raised while checking one update."""
    if isinstance(exc, FedloomError):
        return str(exc)
    return f"update could not be checked: {type(exc).__name__}: {exc}"
