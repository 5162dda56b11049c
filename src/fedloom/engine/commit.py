"""The engine's commit stage: where a round's checkpoint is written, and the events kept in order.

A committer runs a round's commit job (the checkpoint in the state database, the
``metrics.jsonl`` line, the driver's own bookkeeping, the ``round_committed``
event). :class:`InlineCommitter` runs it at once (a simulation that trains in its own
process); :class:`ThreadedCommitter` runs it on a thread of its own while the
next round runs (deployment, where clients would otherwise sit idle through two
fsyncs, and a simulation whose clients train in worker processes or Ray actors,
where this process only waits for them then).

:class:`Sequencer` keeps the event stream in round order either way: from the
moment a commit is handed over until it is durable, later events are held back,
so an observer sees ``round_committed`` for round ``r`` before anything of
round ``r + 1``, and only once round ``r`` is on disk.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from fedloom.engine.events import Event, EventBus

__all__ = ["Committer", "InlineCommitter", "Sequencer", "ThreadedCommitter"]

#: A commit job; it gets the seconds it waited for the commit before it.
Job = Callable[[float], None]


class Committer(Protocol):
    """Runs commit jobs one at a time, in the order handed over."""

    def defer(self, job: Job) -> None: ...

    def flush(self) -> None: ...

    def wait(self) -> float: ...


class InlineCommitter:
    """Runs each commit job as it is handed over."""

    def defer(self, job: Job) -> None:
        job(0.0)

    def flush(self) -> None:
        pass

    def wait(self) -> float:
        return 0.0


class ThreadedCommitter:
    """Commits a finished round on a thread of its own while the next round runs.

    Nothing of the next round depends on a round's commit: its broadcast is the state in
    memory, and a server killed before round ``r``'s commit resumes from round ``r - 1``'s
    checkpoint with round ``r``'s pending updates, still on disk (the driver clears them only
    after the commit), so it recomputes the same state. One commit is in flight at a time, in
    round order.

    A commit handed over (:meth:`defer`) starts at the next :meth:`flush`, which the round loop
    calls once the next round is open: started at once, its Python (the checkpoint's encoding,
    SQLite) would compete for the GIL with the serial step between the rounds.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedloom-commit")
        self._last: Future[None] | None = None
        self._deferred: Job | None = None

    def wait(self) -> float:
        """Block until the last started commit is done (raising its error); returns the seconds waited."""
        start = time.perf_counter()
        last, self._last = self._last, None
        if last is not None:
            last.result()
        return time.perf_counter() - start

    def defer(self, job: Job) -> None:
        """Hand over a commit, started by the next :meth:`flush`."""
        self.flush()
        self._deferred = job

    def flush(self) -> None:
        """Start the commit handed over, once the one before it is done."""
        job, self._deferred = self._deferred, None
        if job is not None:
            waited = self.wait()
            self._last = self._pool.submit(job, waited)

    def __enter__(self) -> ThreadedCommitter:
        return self

    def __exit__(self, *exc: object) -> None:
        """Commit what was handed over, whatever ended the loop (a round's data is never half-written)."""
        try:
            self.flush()
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


_MARK = object()


class Sequencer:
    """Emits events to ``bus`` in round order while commits complete on another thread.

    :meth:`hold` (when a commit is handed over, with the round's own closing events) holds back
    the events emitted after it; :meth:`release` (when that commit is durable) emits the round's
    closing events and its ``round_committed`` event, then the events held back up to the next
    :meth:`hold`. Observers are called under one lock, so they never run concurrently. Handing
    the closing events over instead of emitting them keeps their serialisation (the
    ``events.jsonl`` line, every observer) off the step between two rounds.
    """

    def __init__(self, bus: EventBus) -> None:
        self.bus = bus
        self._lock = threading.Lock()
        self._held: list[object] = []
        self._closing: list[list[Event]] = []  # per hold not yet released, its closing events
        self._inflight = 0

    def emit(self, event: Event) -> None:
        with self._lock:
            if self._inflight:
                self._held.append(event)
            else:
                self.bus.emit(event)

    def hold(self, closing: Sequence[Event] = ()) -> None:
        with self._lock:
            if self._inflight:
                self._held.append(_MARK)
            self._inflight += 1
            self._closing.append(list(closing))

    def release(self, event: Event) -> None:
        with self._lock:
            closing = self._closing.pop(0) if self._closing else []  # empty once drained
            self._inflight = max(self._inflight - 1, 0)
            for first in closing:
                self.bus.emit(first)
            self.bus.emit(event)
            while self._held:
                item = self._held.pop(0)
                if item is _MARK:
                    break
                assert isinstance(item, Event)
                self.bus.emit(item)

    def drain(self) -> None:
        """Emit whatever is held back (a commit failed and will never release it), in order."""
        with self._lock:
            held, self._held, self._inflight = self._held, [], 0
            closing, self._closing = self._closing, []
            for first in closing.pop(0) if closing else ():
                self.bus.emit(first)
            for item in held:
                if item is _MARK:
                    for later in closing.pop(0) if closing else ():
                        self.bus.emit(later)
                elif isinstance(item, Event):
                    self.bus.emit(item)
