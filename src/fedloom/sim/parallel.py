"""The parallel executor: a persistent pool of forked worker processes, one torch thread each.

On a multi-core CPU the lever for many small clients is client-level
parallelism with no orchestration overhead. The pool:

* is forked once, on the first round, and lives until :meth:`ParallelExecutor.close`:
  the workers inherit the workspace, the federated dataset and the transform
  pipeline copy-on-write, so the data is never pickled (``gc.freeze()`` before
  the fork keeps the garbage collector from touching, and so copying, the
  parent's objects);
* packs each round's message -- the algorithm, the broadcast, the cohort and its
  clients' states -- once, into a region every worker reads, and sends it to all;
* lets the workers claim the cohort's positions one at a time, in cohort order,
  from a shared counter, so a worker that is ahead takes the next client and
  neither waits at the end of a round for the other (a split made in advance
  from estimated work misses each client's fixed costs); which worker trains a
  client changes nothing in its update;
* gets the outcomes back with their positions in chunks of ``CHUNK`` clients as
  they finish (so a worker never holds more than a chunk of deltas), and one by
  one for the last ``TAIL`` positions, through shared memory
  (:mod:`fedloom.sim.transport`): :class:`~fedloom.sim.transport.Arena` regions
  mapped before the fork and reused every round (one for the message, one per
  worker for its outcomes), so a round creates no shared-memory segment and
  passes no file descriptor (making a fresh segment per chunk cost about a sixth
  of a 2NN worker's time);
* returns the outcomes in cohort order. Their deltas are views of the pool's
  memory, valid until the next round (the runner is done with them by then);
  client states, which the runner keeps across rounds, are copied out. Each client is trained by
  :func:`~fedloom.sim.executor.run_client` with 1 torch thread, so its update is
  bit-identical to ``SequentialExecutor(threads=1)``'s; the runner aggregates in
  cohort order, so the model is too;
* where the round's aggregation is FedAvg's weighted mean on the raw updates
  (:func:`fedloom.sim.reduce.not_reducible`), the runner calls
  :meth:`ParallelExecutor.run_round_reduced` instead: the workers extend the
  weighted sum in cohort order themselves, through a shared
  :class:`~fedloom.sim.reduce.Ledger` (a worker trains each update into a slot of
  its memory; whoever completes the sum's next position adds it and every later
  one already parked), so the sum is done while the round trains, no delta travels
  to the main process, and the runner receives the aggregate, bit-identical to
  summing every update afterwards.

A worker that dies (killed, out of memory, segfault) makes the round raise
:class:`~fedloom.sim.executor.ExecutorError` naming it; the pool is then shut
down. An exception raised by a client's own work is that client's
:class:`~fedloom.sim.executor.ClientFailure` (see
:func:`~fedloom.sim.executor.run_client`); any other exception in a worker is
re-raised as that error with the worker's traceback. Only the ``fork`` start
method is supported (Linux, macOS with care); elsewhere use the Ray or
sequential executor.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import multiprocessing as mp
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from multiprocessing.sharedctypes import Synchronized

import torch

from fedloom.algorithms.api import (
    Aggregate,
    Algorithm,
    Broadcast,
    ClientState,
    ClientUpdate,
    ServerContext,
    Workspace,
)
from fedloom.algorithms.local import delta_buffers
from fedloom.core.params import Params
from fedloom.data.federated import FederatedDataset
from fedloom.sim.executor import ExecutorError, Outcome, run_client
from fedloom.sim.reduce import Ledger, slot_size, summary
from fedloom.sim.transport import Arena, Packed, pack, unpack
from fedloom.transforms.pipeline import Pipeline

__all__ = ["ParallelExecutor"]

_STOP = None
# Outcomes per reply: a worker holds at most this many private deltas before handing them over,
# so its memory does not grow with its share of the cohort.
CHUNK = 8
# The last this many cohort positions go back one by one, so the parent's sum is nearly done
# when the last client finishes.
TAIL = CHUNK
# Arena sizing: room for this many model-sized tensors per cohort member (delta, an
# algorithm's extras, a client state), within a per-arena cap. Only pages written are
# ever backed by memory; what does not fit goes through a fresh shared segment.
TENSORS_PER_CLIENT = 3
ARENA_CAP = 1 << 30
# The least number of entries in a ledger's table of parked positions.
MIN_TABLE = 64
# A worker hands its heap's free pages back to the system after a client that trained at least
# this long (see _malloc_trim).
TRIM_AFTER_S = 0.5
# How often the main process, waiting for the workers' shared lock, checks that they are alive.
LOCK_CHECK_S = 1.0


def _worker_main(
    conn: Connection,
    workspace: Workspace,
    data: FederatedDataset,
    pipeline: Pipeline,
    siblings: list[Connection],
    down: Arena,
    up: Arena,
    claim: Synchronized[int],
    ledger: Ledger,
) -> None:
    """A worker's loop: receive a round's message, claim and train clients, send their outcomes.

    ``down`` holds the round's message (one region every worker reads), ``up`` what this
    worker returns; the worker resets ``up`` when a round's message arrives (the parent is
    done with the previous round's outcomes by then). ``claim`` is the round's next unclaimed
    cohort position, shared by every worker: each takes one position at a time, so a worker
    that is ahead takes more. Outcomes go back in chunks of ``CHUNK`` with their positions,
    and one by one near the end of the cohort; the last message of a round says the worker
    is done with it (it will claim nothing more).

    In a reduced round each update is trained into a slot of the shared ``ledger`` (taken
    with the position, under ``claim``'s lock) and settled there: added to the round's sum
    when the sum has reached its position, parked for whoever reaches it otherwise (see
    :class:`~fedloom.sim.reduce.Ledger`). The outcomes sent back carry no delta.
    """
    torch.set_num_threads(1)
    trim = _malloc_trim()

    def in_arena(like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [up.empty(t) for t in like]

    for other in siblings:  # the parent's ends of its own and earlier workers' pipes, inherited by the fork:
        other.close()  # close them so a dead parent shows up as EOF in every worker at once
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                return
            if msg is _STOP:
                return
            try:
                algorithm, broadcast, cids, states, ctx, reduced = unpack(msg, down)
                del msg
                up.reset()
                n = len(cids)
                names = list(workspace.module.state_dict()) if reduced else []
                like = [broadcast.params[k] for k in names]
                chunk: list[Outcome] = []
                positions: list[int] = []
                while True:
                    with claim.get_lock():
                        pos = claim.value
                        claim.value = pos + 1
                        slot = ledger.take() if reduced and pos < n else -1
                    if pos >= n:
                        break
                    room = ledger.views(slot, like) if slot >= 0 else None
                    started = time.monotonic()
                    with delta_buffers(in_arena if room is None else _into(room)):
                        # each update is written where it is read: the parent's region, or the ledger's slot
                        outcome = run_client(
                            workspace, data, pipeline, algorithm, broadcast, cids[pos], states, ctx
                        )
                    long = time.monotonic() - started >= TRIM_AFTER_S
                    if reduced:
                        if isinstance(outcome, ClientUpdate):  # the slot is reused once the sum passes it
                            outcome = _state_off(outcome, ledger.region)
                        ledger.settle(pos, slot, outcome, like, names)
                        if isinstance(outcome, ClientUpdate):
                            outcome = summary(outcome)
                    chunk.append(outcome)
                    positions.append(pos)
                    if len(chunk) == CHUNK or pos >= n - TAIL:
                        # What lies in ``up`` already is not copied.
                        conn.send(("ok", positions, pack(chunk, up), False))
                        chunk, positions = [], []
                    if long:
                        trim()
                conn.send(("ok", positions, pack(chunk, up), True))
                del broadcast, states, like
            except Exception as exc:
                conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    except KeyboardInterrupt:
        return


def _malloc_trim() -> Callable[[], object]:
    """glibc's ``malloc_trim(0)``, which hands every free page of the heap back to the system;
    elsewhere (musl, macOS) a call that does nothing.

    A client's training frees what it allocated, but glibc keeps the freed pages of its heap
    resident, scattered between live blocks, and the next client's allocations land on pages
    of their own as often as on those: left alone, a worker's private memory creeps up from
    client to client. A worker trims after a client that trained for ``TRIM_AFTER_S`` or
    more, where the cost (about a millisecond, and the page faults that map the pages again)
    is noise; short clients have small live sets and pay nothing.
    """
    try:
        release = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return lambda: None
    release.argtypes = [ctypes.c_size_t]
    return lambda: release(0)


def _into(room: list[torch.Tensor]) -> Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]:
    """Delta buffers: ``room`` (a ledger slot) for the client's first update of its layout, fresh
    memory for anything else (a second delta computed by the same client must not share it)."""
    given = False

    def buffers(like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        nonlocal given
        if (
            not given
            and len(like) == len(room)
            and all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(like, room, strict=True))
        ):
            given = True
            return room
        return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in like]

    return buffers


def _state_off(update: ClientUpdate, region: Arena) -> ClientUpdate:
    """``update`` with any client state that lies in ``region`` (a ledger slot) copied out."""
    state = update.client_state
    if state is None:
        return update

    def inside(p: Params) -> bool:
        return any(region.holds(t) is not None for t in p.values())

    if not any(inside(p) for p in state.values.values()):
        return update
    values = {k: p.clone() if inside(p) else p for k, p in state.values.items()}
    return replace(update, client_state=ClientState(values=values))


def _warm_optimizer(workspace: Workspace) -> None:
    """Take one step of the task's ``torch.optim`` optimiser on a scratch tensor, before the fork.

    A process's first optimiser step imports a large part of torch (about 800 modules, some
    80 MB resident). Done once here, those pages are shared by every forked worker instead of
    being imported again in each. Plain SGD (fedloom's own update) needs no optimiser.
    """
    spec = workspace.optimizer
    if (spec is None or spec.is_plain_sgd()) and workspace.train_fn is None:
        return
    scratch = torch.zeros(1, requires_grad=True)
    scratch.grad = torch.zeros(1)
    factory = spec.factory if spec is not None else torch.optim.SGD
    try:
        factory([scratch], lr=0.0).step()
    except Exception:  # only a warm-up: a factory that needs other arguments is imported in the workers
        return


class ParallelExecutor:
    """Trains each round's cohort on ``workers`` forked processes (see the module docstring).

    Use as a context manager, or call :meth:`close` when done. The workspace,
    data and pipeline are captured when the pool starts (the first round) and
    must not change afterwards.
    """

    def __init__(
        self, workspace: Workspace, data: FederatedDataset, pipeline: Pipeline, *, workers: int
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if "fork" not in mp.get_all_start_methods():
            raise ExecutorError(
                "the parallel executor needs the 'fork' start method, which this platform lacks; "
                "use executor = 'sequential' or 'ray'"
            )
        self.workspace = workspace
        self.data = data
        self.pipeline = pipeline
        self.workers = workers
        self._procs: list[BaseProcess] = []
        self._conns: list[Connection] = []
        self._down: Arena | None = None  # the round's message, read by every worker
        self._ups: list[Arena] = []  # what each worker returns
        self._claim: Synchronized[int] | None = None  # the round's next unclaimed cohort position
        self._ledger: Ledger | None = None  # a reduced round's sum, extended by the workers
        self.on_dispatch: Callable[[], None] | None = None  # see fedloom.sim.executor.Dispatching

    # ---- lifecycle ------------------------------------------------------
    def start(self, cohort_size: int = 1) -> None:
        """Fork the workers (done automatically by the first round).

        ``cohort_size`` sizes the shared regions (a round with a larger cohort
        still works; what does not fit travels in fresh shared segments).
        """
        if self._procs:
            return
        state = list(self.workspace.module.state_dict().values())
        model_bytes = sum(t.numel() * t.element_size() for t in state)
        nbytes = min(ARENA_CAP, (max(cohort_size, 1) * TENSORS_PER_CLIENT + 4) * model_bytes + (1 << 20))
        ctx = mp.get_context("fork")
        _warm_optimizer(self.workspace)
        self._down, self._claim = _arena(nbytes), ctx.Value("q", 0)
        # Room to park up to a cohort's updates (only the slots written are ever backed by memory).
        slot = slot_size(state)
        slots = max(min(cohort_size, ARENA_CAP // slot - 1), 1)
        self._ledger = Ledger(slots, slot, max(cohort_size, slots, MIN_TABLE), self._claim.get_lock())
        gc.collect()
        gc.freeze()  # objects alive now stay out of the GC's reach, so children share their pages
        _malloc_trim()()  # and free heap pages are not inherited, to be held by every worker
        try:
            for i in range(self.workers):
                parent, child = ctx.Pipe(duplex=True)
                up = _arena(nbytes)
                proc = ctx.Process(
                    target=_worker_main,
                    # The child also inherits the parent's end of its own pipe: it must close that
                    # too, or it never sees EOF when the parent dies and lives on as an orphan.
                    args=(
                        child,
                        self.workspace,
                        self.data,
                        self.pipeline,
                        [*self._conns, parent],
                        self._down,
                        up,
                        self._claim,
                        self._ledger,
                    ),
                    name=f"fedloom-worker-{i}",
                    daemon=True,
                )
                proc.start()
                child.close()
                self._procs.append(proc)
                self._conns.append(parent)
                self._ups.append(up)
        finally:
            gc.unfreeze()

    def close(self, *, now: bool = False) -> None:
        """Stop the workers; safe to call more than once.

        ``now``: the round was abandoned (an error, a dead worker, an interrupt), so workers may be
        inside it, waiting for a position that will never be settled: stop them at once rather
        than asking and waiting.
        """
        for conn in self._conns:
            with contextlib.suppress(OSError, ValueError):
                conn.send(_STOP)
        deadline = time.monotonic() + (0.0 if now else 5.0)
        for proc in self._procs:
            proc.join(timeout=max(deadline - time.monotonic(), 0.0))
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        for conn in self._conns:
            conn.close()
        self._procs, self._conns, self._ups, self._down, self._claim = [], [], [], None, None
        self._ledger = None

    def __enter__(self) -> ParallelExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_procs", None):
            self.close()

    # ---- a round --------------------------------------------------------
    def run_round(
        self,
        algorithm: Algorithm,
        broadcast: Broadcast,
        cohort: Sequence[int],
        client_states: Mapping[int, ClientState],
        ctx: ServerContext,
    ) -> list[Outcome]:
        return self._train(algorithm, broadcast, [int(c) for c in cohort], client_states, ctx, reduced=False)

    def run_round_reduced(
        self,
        algorithm: Algorithm,
        broadcast: Broadcast,
        cohort: Sequence[int],
        client_states: Mapping[int, ClientState],
        ctx: ServerContext,
    ) -> tuple[list[Outcome], Aggregate | None]:
        """Train the cohort and sum its weighted mean as outcomes arrive (see :mod:`fedloom.sim.reduce`).

        Returns the outcomes with every delta removed, in cohort order, and the round's
        aggregate (``None`` when no update came back).
        """
        cids = [int(c) for c in cohort]
        results = self._train(algorithm, broadcast, cids, client_states, ctx, reduced=True)
        if not any(isinstance(o, ClientUpdate) for o in results):
            return results, None
        assert self._ledger is not None
        names = list(self.workspace.module.state_dict())
        try:
            return results, self._ledger.result(results, [broadcast.params[k] for k in names], names)
        except RuntimeError as exc:  # every worker said it was done: the chain must be complete
            raise ExecutorError(f"round {ctx.round}: {exc}") from exc

    def _train(
        self,
        algorithm: Algorithm,
        broadcast: Broadcast,
        cids: list[int],
        client_states: Mapping[int, ClientState],
        ctx: ServerContext,
        *,
        reduced: bool,
    ) -> list[Outcome]:
        if not cids:
            return []
        self.start(len(cids))
        assert self._down is not None
        assert self._claim is not None
        states = {c: client_states[c] for c in cids if c in client_states}
        # Every worker finished reading the last round's message before it said it was done.
        self._down.reset()
        msg = pack((algorithm, broadcast, cids, states, ctx, reduced), self._down)
        assert self._ledger is not None
        with self._shared(ctx):
            self._claim.value = 0
            self._ledger.begin()
        results: list[Outcome | None] = [None] * len(cids)
        busy = set(range(self.workers))  # workers that have not said they are done with the round
        try:
            for w in range(self.workers):
                self._send(w, msg, ctx)
            if self.on_dispatch is not None:
                self.on_dispatch()
            while busy:
                self._collect(busy, results, ctx)
        except BaseException:
            # Workers left inside this round would read a next round's message region and claim its
            # positions with this round's work: a round that did not finish takes the pool with it.
            self.close(now=True)
            raise
        missing = [cids[i] for i, r in enumerate(results) if r is None]
        if missing:  # every position is claimed once and its outcome sent before the claimant is done
            raise ExecutorError(f"round {ctx.round}: no outcome came back for clients {missing}")
        return [r for r in results if r is not None]

    def _send(self, w: int, msg: Packed, ctx: ServerContext) -> None:
        try:
            self._conns[w].send(msg)
        except (OSError, ValueError) as exc:
            raise self._died(w, ctx) from exc

    def _collect(
        self,
        busy: set[int],
        results: list[Outcome | None],
        ctx: ServerContext,
    ) -> None:
        conns = {self._conns[w]: w for w in busy}
        sentinels = {self._procs[w].sentinel: w for w in busy}
        ready = wait([*conns, *sentinels])
        for obj in ready:
            if isinstance(obj, Connection):
                w = conns[obj]
                try:
                    reply = obj.recv()
                except (EOFError, OSError) as exc:
                    raise self._died(w, ctx) from exc
                if reply[0] != "ok":
                    self.close(now=True)
                    raise ExecutorError(f"round {ctx.round}: worker {w} failed:\n{reply[1]}")
                _, positions, body, done = reply
                outcomes: list[Outcome] = unpack(body, self._ups[w])
                # Per outcome, while the workers still train: the result keeps its own copy of the state.
                for pos, outcome in zip(positions, outcomes, strict=True):
                    results[pos] = _own_client_state(outcome)
                if done:
                    busy.discard(w)
        for obj in ready:
            if isinstance(obj, int) and obj in sentinels:
                w = sentinels[obj]
                if w in busy and not self._conns[w].poll():
                    raise self._died(w, ctx)

    @contextlib.contextmanager
    def _shared(self, ctx: ServerContext) -> Iterator[None]:
        """Hold the workers' shared lock (the claim counter's, which also guards the ledger).

        A worker holds it for a few microseconds; one that died holding it (killed, out of
        memory) would hold it forever, so waiting checks that every worker is alive.
        """
        assert self._claim is not None
        lock = self._claim.get_lock()
        while not lock.acquire(timeout=LOCK_CHECK_S):
            for w, proc in enumerate(self._procs):
                if not proc.is_alive():
                    raise self._died(w, ctx)
        try:
            yield
        finally:
            lock.release()

    def _died(self, w: int, ctx: ServerContext) -> ExecutorError:
        proc = self._procs[w]
        proc.join(timeout=1)
        code = proc.exitcode
        self.close(now=True)
        how = f"exit code {code}" if code is None or code >= 0 else f"signal {-code}"
        return ExecutorError(
            f"round {ctx.round}: parallel worker {w} (pid {proc.pid}) died ({how}); "
            "the pool was shut down. If it ran out of memory, use fewer workers"
        )


def _arena(nbytes: int) -> Arena:
    """An arena of ``nbytes``, or a smaller one where the OS refuses the mapping (strict overcommit)."""
    while True:
        try:
            return Arena(nbytes)
        except OSError:
            if nbytes <= 1 << 20:
                raise
            nbytes //= 4  # what no longer fits travels in fresh shared segments


def _own_client_state(outcome: Outcome) -> Outcome:
    """``outcome`` with its client state copied out of the worker's arena (it outlives the round)."""
    if not isinstance(outcome, ClientUpdate) or outcome.client_state is None:
        return outcome
    values = {k: v.clone() for k, v in outcome.client_state.values.items()}
    return replace(outcome, client_state=ClientState(values=values))
