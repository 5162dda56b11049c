"""Round bookkeeping for the deployed server: open, collect, close (no grpc here).

The deployment driver (:mod:`fedloom.net.driver`) opens a round attempt
(:meth:`Coordinator.open_round`), the RPC handlers hand in updates
(:meth:`Coordinator.submit`; in the server they all run on one event-loop thread, see
:mod:`fedloom.net.serving`, but the class is thread-safe), and the driver blocks in
:meth:`Coordinator.wait_close` until the attempt closes:

* as soon as ``target`` updates are accepted (the cohort size; with over-selection
  more clients were asked than needed), or
* once every selected client has answered (accepted or reported a failure), or
* at the deadline.

Every incoming update is validated before it counts: the round it names (an
older round is *late* if its sender was selected then, else a *replay*; a future
round is refused), the sender's selection, duplicates, the broadcast it was
trained on, that it parses, then :func:`~fedloom.net.validation.validate_update`
and the pipeline's own ``decode`` checks (a packed update, from a codec stage, is unpacked first,
so these checks see the delta it stands for). A rejected update gets its reason back, a
log line and an audit row (and counts among the attempt's rejections, see
:class:`Closed`); nothing already accepted is touched. Any exception raised while
checking one update rejects that update, never more. Accepted updates are written to
the ``pending`` table before the client hears "accepted", so a killed server loses
none; the pending updates restored after a restart pass the same checks, and one that
fails is rejected and its row dropped.

Each selected client has one outcome per round attempt: an accepted update or a
failure report, whichever came first; a second is refused.

Under secure aggregation (``open_round(..., relay=...)``, see :mod:`fedloom.net.secure`)
plaintext uploads are refused outright -- nothing is staged or stored -- and selected
clients take part through :meth:`Coordinator.secure_exchange`; the driver drives
the relay and closes the attempt with :meth:`Coordinator.close_secure`.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fedloom.algorithms.api import Broadcast, ServerContext
from fedloom.algorithms.requirements import UNDECLARED, UpdateRequirements
from fedloom.core.errors import FedloomError
from fedloom.core.params import Params
from fedloom.net.attempt import Closed, OpenAttempt, Task
from fedloom.net.logs import JsonLog
from fedloom.net.state import NetState, PendingUpdate, blob_checksum
from fedloom.net.validation import Limits, cut, one_pass, rejection_reason, validate_update
from fedloom.net.wire import EMPTY_PATCH, EMPTY_PATCH_XXH3, decode_update, fingerprint
from fedloom.transforms.adaptive_clip import bind_pipeline
from fedloom.transforms.pipeline import Pipeline, bind_model, packs

if TYPE_CHECKING:  # fedloom.net.secure needs the optional 'secure' extra
    from fedloom.net.secure import SecureOutcome, SecureRelay

__all__ = ["Closed", "Coordinator", "Task"]


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
        self._limits = Limits(
            requirements=requirements,
            max_norm=max_update_norm,
            max_weight=max_weight,
            uniform=weighting == "uniform",
        )
        self._ids = {n: i for i, n in enumerate(self.names)}
        self._state = state
        self._pipeline = pipeline
        self._packed = any(packs(s) for s in pipeline.stages)
        self._log = log
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
        self._round: OpenAttempt | None = None
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
        patch: tuple[str, bytes | None] | None = None,
    ) -> None:
        """Open round ``broadcast.round`` for ``selected``; ``pending`` were accepted before a restart.

        ``algo_state`` binds stateful pipeline stages (adaptive clipping) for this round's decode;
        ``relay`` makes it a secure round (no uploads; ``pending`` must be empty); ``patch`` (under
        ``compression.downlink_patch``) is ``(digest of the last round's broadcast, this broadcast as a
        patch against it, or None where that is not smaller)``: clients that hold that broadcast get
        the patch instead of ``blob``, and clients that hold ``blob`` itself an empty patch.
        """
        round_pipeline = bind_model(bind_pipeline(self._pipeline, algo_state or {}), broadcast.params)
        rnd = OpenAttempt(
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
        if patch is not None:
            rnd.patching = True
            rnd.patch_base, rnd.patch = patch
            rnd.patch_xxh3 = fingerprint(rnd.patch) if rnd.patch is not None else 0
        restored = 0
        for p in pending:
            try:
                update, compute = decode_update(p.client_id, p.meta_json, p.blob)
                fin, sq = self._blob_pass(p.blob)
                update = validate_update(
                    round_pipeline.unpack(update, ctx),
                    rnd.broadcast,
                    self._limits,
                    client=self.names[p.client_id],
                    finite=fin,
                    square=sq,
                )
                rnd.accepted[p.client_id] = round_pipeline.decode_unpacked(update, ctx)
                rnd.compute_s[p.client_id] = compute
                rnd.sizes[p.client_id] = len(p.blob)
                restored += 1
            except Exception as exc:  # one bad row is that update's rejection, never the round's end
                self._state.drop_pending(rnd.number, p.client_id)
                self.reject(p.client_id, rnd.number, len(p.blob), "restored update: " + rejection_reason(exc))
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
        return Closed(
            updates,
            dict(rnd.compute_s),
            dict(rnd.failed),
            dropouts,
            rnd.timing.summary(),
            rejected=list(rnd.rejected),
            sizes=dict(rnd.sizes),
            bytes_down=rnd.bytes_down,
        )

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
        return Closed(
            [],
            compute,
            dict(rnd.failed),
            dropouts,
            rnd.timing.summary(),
            secure=outcome,
            rejected=list(rnd.rejected),
            # the relay's count of each client's SecAgg messages; the broadcast plus its replies down
            sizes=dict(outcome.bytes_up) if outcome is not None else {},
            bytes_down=rnd.bytes_down + (outcome.bytes_down if outcome is not None else 0),
        )

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
    def task_now(self, cid: int, held: str = "") -> Task | None:
        """``cid``'s task if there is one now ("train" or "done"), else ``None`` (it should wait).

        ``held``: the digest of the broadcast the client holds; where the round has a patch against
        it, the task names the patch (``Task.base``). Never blocks: the server's long-poll waits for
        :meth:`watch_tasks` to fire between tries.
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
            patch = self._patch_for(rnd, held)
            return Task(
                "train",
                round=rnd.number,
                digest=rnd.digest,
                size=len(patch[1]) if patch is not None else len(rnd.blob),
                xxh3=patch[2] if patch is not None else rnd.xxh3,
                base=held if patch is not None else "",
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

    def broadcast_blob(self, round: int, digest: str, base: str = "") -> bytes | None:
        """The open round's broadcast named ``digest`` (with ``base``: its patch against that earlier
        broadcast), or ``None`` if no such round or patch is open."""
        with self._cond:
            rnd = self._round
            if rnd is None or rnd.number != round or rnd.digest != digest:
                return None
            if base:
                patch = self._patch_for(rnd, base)
                return patch[1] if patch is not None else None
            return rnd.blob

    @staticmethod
    def _patch_for(rnd: OpenAttempt, held: str) -> tuple[str, bytes, int] | None:
        """``(base, patch, its XXH3)`` for a client holding the broadcast ``held`` under
        ``compression.downlink_patch``: the round's patch against the last round's broadcast, or an
        empty patch if the client holds this very model (from an earlier attempt of the round)."""
        if not rnd.patching or not held:
            return None
        if held == rnd.digest:
            return held, EMPTY_PATCH, EMPTY_PATCH_XXH3
        if held == rnd.patch_base and rnd.patch is not None:
            return held, rnd.patch, rnd.patch_xxh3
        return None

    def note_download(self, round: int, start: float, end: float, nbytes: int = 0) -> None:
        """Record that a client got ``round``'s broadcast (``nbytes``) in ``start`` .. ``end`` (perf_counter)."""
        with self._cond:
            if self._round is not None and self._round.number == round:
                self._round.timing.add_download(start, end)
                self._round.bytes_down += nbytes

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

    def _blob_pass(self, blob: bytes | memoryview) -> tuple[bool | None, float | None]:
        """:func:`~fedloom.net.validation.one_pass` over a plain update's blob; nothing for a packed
        one (its codes are no delta)."""
        if self._packed:
            return None, None
        return one_pass(blob)

    def reject(self, cid: int, round: int, nbytes: int, reason: str, *, event: str = "rejected") -> str:
        reason = cut(reason)
        self.rejections[event] += 1
        name = self.names[cid] if 0 <= cid < len(self.names) else "?"
        with self._cond:
            if self._round is not None and self._round.open and 0 <= cid < len(self.names):
                self._round.rejected.append((cid, reason))
        self._state.audit(round, cid, name, event, nbytes, reason)
        self._log("update_" + event, level="warning", client=name, round=round, bytes=nbytes, reason=reason)
        return reason

    def report_failure(self, cid: int, round: int, reason: str) -> str | None:
        """A client could not train (e.g. diverged); counts as its answer for the round."""
        reason = cut(reason)
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
            fin, sq = self._blob_pass(held)
            update = validate_update(
                rnd.pipeline.unpack(update, rnd.ctx),
                rnd.broadcast,
                self._limits,
                client=self.names[cid],
                finite=fin,
                square=sq,
            )
            decoded = rnd.pipeline.decode_unpacked(update, rnd.ctx)
        except Exception as exc:  # whatever breaks on one update rejects it and frees its slot
            self._state.discard(staged)
            return self.reject(cid, round, len(blob), rejection_reason(exc))
        t_record = time.perf_counter()
        with self._cond:
            why = self._check_slot(cid, round, digest)  # the round may have closed meanwhile
            if why is None and self._round is not rnd:
                why = "late"  # the attempt it was validated against closed and a new one opened
            if why is None:
                self._state.record_pending(staged, self.names[cid], meta_json, f"attempt {rnd.attempt}")
                rnd.accepted[cid] = decoded
                rnd.compute_s[cid] = compute
                rnd.sizes[cid] = len(blob)
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
