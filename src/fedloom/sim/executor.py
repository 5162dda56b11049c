"""Executors: run one round's client updates. The sequential executor is the reference.

An executor receives the round's broadcast and cohort and returns one outcome
per client, in cohort order: a :class:`ClientUpdate` (already passed through the
client side of the transform pipeline) or a :class:`ClientFailure`, an error
value the runner filters out before aggregation. Faster executors must return
the same outcomes as :class:`SequentialExecutor`.

Whatever a client's own work raises (the model's forward pass, the loss, a
data transform, the client side of the pipeline) is that client's failure: an
:class:`Exception` becomes a :class:`ClientFailure` naming the round, the client
and the exception, and one warning on the ``fedloom`` logger says so (with the
traceback at debug level). Only :class:`BaseException` s that are not
:class:`Exception` (``KeyboardInterrupt``, ``SystemExit``) stop the run.

Executors that hold resources (worker processes, Ray actors) have a ``close()``
method; :func:`close_executor` calls it when present. The helpers here
(:func:`client_costs`, :func:`lpt_assign`) split a cohort over Ray's actors in
advance, deterministically; the parallel executor's workers claim clients as
they go instead (see :mod:`fedloom.sim.parallel`).

Bit-identity and threads: a client's update is bit-identical across executors
when it is computed with the same number of torch intra-op threads (matrix
kernels split their sums differently with more threads; differences are ~1e-8
relative). Worker processes and Ray actors always use one thread, and so does
:class:`SequentialExecutor` by default, so a seeded run gives the same model
bit for bit whatever the executor and the number of workers.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch

from fedloom.algorithms.api import (
    Algorithm,
    Broadcast,
    ClientContext,
    ClientState,
    ClientUpdate,
    ServerContext,
    Workspace,
)
from fedloom.algorithms.local import LocalSGD, client_update_with_state
from fedloom.core.errors import ExecutorError, FedloomError, TrainingError
from fedloom.data.federated import FederatedDataset
from fedloom.transforms.pipeline import Pipeline

__all__ = [
    "ClientFailure",
    "Dispatching",
    "Executor",
    "ExecutorError",
    "Outcome",
    "SequentialExecutor",
    "client_costs",
    "client_failure",
    "close_executor",
    "lpt_assign",
    "run_client",
    "torch_threads",
]


log = logging.getLogger("fedloom")


@dataclass(frozen=True)
class ClientFailure:
    """A client that produced no usable update; ``diverged`` marks a NaN/inf training loss."""

    client_id: int
    reason: str
    diverged: bool = False


Outcome = ClientUpdate | ClientFailure


class Executor(Protocol):
    def run_round(
        self,
        algorithm: Algorithm,
        broadcast: Broadcast,
        cohort: Sequence[int],
        client_states: Mapping[int, ClientState],
        ctx: ServerContext,
    ) -> list[Outcome]: ...


class Dispatching(Protocol):
    """An executor whose clients train outside this process.

    It calls ``on_dispatch`` (when set) once a round's work is handed out, so the
    runner can commit the previous round on a thread of its own while the clients
    train: this process only waits for them then.
    """

    on_dispatch: Callable[[], None] | None


class SequentialExecutor:
    """Trains the cohort one client after another in this process, reusing one workspace.

    ``threads`` > 0 runs the clients with that many torch threads (restoring the
    previous setting afterwards); 0 leaves torch's setting alone. The default, 1,
    makes its results bit-identical to the multi-worker executors.
    """

    def __init__(
        self, workspace: Workspace, data: FederatedDataset, pipeline: Pipeline, *, threads: int = 1
    ) -> None:
        if threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = leave torch's setting), got {threads}")
        self.workspace = workspace
        self.data = data
        self.pipeline = pipeline
        self.threads = threads

    def run_round(
        self,
        algorithm: Algorithm,
        broadcast: Broadcast,
        cohort: Sequence[int],
        client_states: Mapping[int, ClientState],
        ctx: ServerContext,
    ) -> list[Outcome]:
        with torch_threads(self.threads):
            return [
                run_client(
                    self.workspace,
                    self.data,
                    self.pipeline,
                    algorithm,
                    broadcast,
                    int(cid),
                    client_states,
                    ctx,
                )
                for cid in cohort
            ]

    def close(self) -> None:
        """Nothing to release."""


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (``n == 0``: unchanged), then restore."""
    if n <= 0 or n == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def close_executor(executor: object) -> None:
    """Release an executor's workers if it has a ``close()`` method."""
    close = getattr(executor, "close", None)
    if callable(close):
        close()


def client_costs(algorithm: Algorithm, data: FederatedDataset, cohort: Sequence[int]) -> list[int]:
    """Estimated work per cohort member: examples processed in local training.

    Uses the algorithm's ``local`` :class:`~fedloom.algorithms.local.LocalSGD` when it
    has one (``steps * min(n, batch_size)``), otherwise the client's size.
    """
    local = getattr(algorithm, "local", None)
    sizes = [data.client_size(int(cid)) for cid in cohort]
    if isinstance(local, LocalSGD):
        return [local.num_steps(n) * min(n, local.batch_size) if n > 0 else 1 for n in sizes]
    return [max(n, 1) for n in sizes]


def lpt_assign(costs: Sequence[int], workers: int) -> list[list[int]]:
    """Greedy longest-processing-time split of positions ``0..len(costs)-1`` over ``workers``.

    The most expensive item goes to the least-loaded worker (ties: lower worker
    index; equal costs keep cohort order), so the split is deterministic. Each
    worker's positions are returned in ascending (cohort) order.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    heap = [(0, w) for w in range(workers)]
    shares: list[list[int]] = [[] for _ in range(workers)]
    for i in order:
        load, w = heapq.heappop(heap)
        shares[w].append(i)
        heapq.heappush(heap, (load + costs[i], w))
    return [sorted(s) for s in shares]


def run_client(
    workspace: Workspace,
    data: FederatedDataset,
    pipeline: Pipeline,
    algorithm: Algorithm,
    broadcast: Broadcast,
    cid: int,
    client_states: Mapping[int, ClientState],
    ctx: ServerContext,
) -> Outcome:
    """One client's work: local update, then the pipeline's client side; errors become values."""
    cctx = ClientContext(seed=ctx.seed, round=ctx.round, client_id=cid)
    try:
        update = client_update_with_state(
            algorithm, workspace, broadcast, client_states.get(cid), data.client_data(cid), cctx
        )
        return pipeline.client(update, ctx)
    except Exception as exc:  # the client's own error fails that client, never the run
        return client_failure(cid, ctx.round, exc)


def client_failure(cid: int, round: int, exc: Exception) -> ClientFailure:
    """The error value for an exception raised by client ``cid``'s work in ``round``.

    A :class:`TrainingError` marks the client as diverged; another
    :class:`FedloomError` already names what went wrong. Any other exception
    (raised by user code: a model, a loss, a dataset) is logged as a warning
    naming the round, the client and the exception, and its reason says the same.
    """
    if isinstance(exc, TrainingError):
        return ClientFailure(cid, str(exc), diverged=True)
    if isinstance(exc, FedloomError):
        return ClientFailure(cid, str(exc))
    reason = f"round {round}, client {cid}: client code raised {type(exc).__name__}: {exc}"
    log.warning("%s", reason)
    log.debug("round %d, client %d: traceback", round, cid, exc_info=exc)
    return ClientFailure(cid, reason)
