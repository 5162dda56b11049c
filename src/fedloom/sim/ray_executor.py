"""The Ray executor: the parallel executor's design on Ray actors, for a machine or a cluster.

Needs the ``ray`` extra (``pip install 'fedloom[ray]'``). At construction the
workspace, the federated dataset and the pipeline are put in Ray's object
store once (``ray.put``); ``workers`` actors are started, each with one torch
thread, and fetch them once. Each round the broadcast is put once and every
actor gets its LPT share of the cohort (the same split as the parallel
executor) plus those clients' states; outcomes come back in cohort order.
Every client runs :func:`~fedloom.sim.executor.run_client` with one torch
thread, so results equal ``SequentialExecutor(threads=1)``'s bit for bit.

Where the round's aggregation is FedAvg's weighted mean on the raw updates
(:func:`fedloom.sim.reduce.not_reducible`), the runner calls
:meth:`RayExecutor.run_round_reduced` instead: actors train contiguous runs of the
cohort, keep their deltas, report weights and metrics, and then reduce the
weighted sum among themselves in cohort order -- the partial sum passes from
actor to actor through the object store -- so the driver receives one
aggregate instead of every update, still bit-identical to sequential.

If Ray is not running yet, a local instance is started
(``ray.init(num_cpus=workers)``); to use a cluster, connect first
(``ray.init(address="auto")`` or set ``RAY_ADDRESS``) -- see docs/executors.md. An
actor that dies raises :class:`~fedloom.sim.executor.ExecutorError`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ray
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
from fedloom.core.params import Params
from fedloom.data.federated import FederatedDataset
from fedloom.sim.executor import ExecutorError, Outcome, client_costs, lpt_assign, run_client
from fedloom.sim.reduce import contiguous_shares, finished, summary, weights
from fedloom.transforms.pipeline import Pipeline

__all__ = ["RayExecutor"]


class _ClientWorker:
    """One actor: a private workspace and the shared data, trained with one torch thread."""

    def __init__(self, workspace: Workspace, data: FederatedDataset, pipeline: Pipeline) -> None:
        torch.set_num_threads(1)
        self.workspace, self.data, self.pipeline = workspace, data, pipeline
        self.held: dict[int, Params] = {}

    def ready(self) -> bool:
        return True

    def run(
        self,
        algorithm: Algorithm,
        broadcast: Broadcast,
        cids: list[int],
        states: Mapping[int, ClientState],
        ctx: ServerContext,
    ) -> list[Outcome]:
        return [
            run_client(self.workspace, self.data, self.pipeline, algorithm, broadcast, cid, states, ctx)
            for cid in cids
        ]

    def train(
        self,
        algorithm: Algorithm,
        broadcast: Broadcast,
        cids: list[int],
        states: Mapping[int, ClientState],
        ctx: ServerContext,
    ) -> list[Outcome]:
        """:meth:`run`, keeping the deltas here and returning only summaries (see :mod:`fedloom.sim.reduce`)."""
        outcomes = self.run(algorithm, broadcast, cids, states, ctx)
        self.held = {o.client_id: o.delta for o in outcomes if isinstance(o, ClientUpdate)}
        return [summary(o) if isinstance(o, ClientUpdate) else o for o in outcomes]

    def reduce(self, pairs: list[tuple[int, float]], acc: Params | None) -> Params | None:
        """Continue the round's weighted sum over this worker's kept clients (in cohort order)."""
        held, self.held = self.held, {}
        if not pairs:
            return acc
        start = acc.map(torch.clone) if acc is not None else None  # the object store's copy is read-only
        return Params.accumulate(start, [held[c] for c, _ in pairs], [w for _, w in pairs])


class RayExecutor:
    """Trains each round's cohort on ``workers`` Ray actors (see the module docstring)."""

    def __init__(
        self,
        workspace: Workspace,
        data: FederatedDataset,
        pipeline: Pipeline,
        *,
        workers: int,
        init_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._started_ray = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"num_cpus": workers, "include_dashboard": False, "log_to_driver": False}
            kwargs.update(init_kwargs or {})
            ray.init(**kwargs)
            self._started_ray = True
        self.data = data
        self.workers = workers
        self.on_dispatch: Callable[[], None] | None = None  # see fedloom.sim.executor.Dispatching
        actor_cls: Any = ray.remote(num_cpus=1)(_ClientWorker)
        refs = ray.put(workspace), ray.put(data), ray.put(pipeline)
        self._actors: list[Any] = [actor_cls.remote(*refs) for _ in range(workers)]
        try:
            ray.get([a.ready.remote() for a in self._actors])
        except ray.exceptions.RayError as exc:
            self.close()
            raise ExecutorError(f"Ray actors failed to start: {exc}") from exc

    def run_round(
        self,
        algorithm: Algorithm,
        broadcast: Broadcast,
        cohort: Sequence[int],
        client_states: Mapping[int, ClientState],
        ctx: ServerContext,
    ) -> list[Outcome]:
        cids = [int(c) for c in cohort]
        if not cids:
            return []
        shares = lpt_assign(client_costs(algorithm, self.data, cids), self.workers)
        calls = self._start("run", algorithm, broadcast, cids, shares, client_states, ctx)
        replies = self._get([ref for _, _, ref in calls], ctx)
        results: list[Outcome | None] = [None] * len(cids)
        for (positions, _, _), outcomes in zip(calls, replies, strict=True):
            for pos, outcome in zip(positions, outcomes, strict=True):
                results[pos] = outcome
        return [r for r in results if r is not None]

    def _start(
        self,
        method: str,
        algorithm: Algorithm,
        broadcast: Broadcast,
        cids: list[int],
        shares: list[list[int]],
        client_states: Mapping[int, ClientState],
        ctx: ServerContext,
    ) -> list[tuple[list[int], Any, Any]]:
        """``(positions, actor, result ref)`` per actor with a non-empty share, calling ``method``."""
        bref, aref = ray.put(broadcast), ray.put(algorithm)
        calls = []
        for actor, positions in zip(self._actors, shares, strict=True):
            if positions:
                mine = [cids[i] for i in positions]
                states = {c: client_states[c] for c in mine if c in client_states}
                calls.append((positions, actor, getattr(actor, method).remote(aref, bref, mine, states, ctx)))
        if self.on_dispatch is not None:
            self.on_dispatch()
        return calls

    def _get(self, refs: Any, ctx: ServerContext) -> Any:
        """``ray.get(refs)``, a dead or failing actor turned into :class:`ExecutorError`."""
        try:
            return ray.get(refs)
        except ray.exceptions.RayActorError as exc:
            self.close()
            raise ExecutorError(f"round {ctx.round}: a Ray actor died: {exc}") from exc
        except ray.exceptions.RayTaskError as exc:
            raise ExecutorError(f"round {ctx.round}: a Ray actor failed: {exc}") from exc

    def run_round_reduced(
        self,
        algorithm: Algorithm,
        broadcast: Broadcast,
        cohort: Sequence[int],
        client_states: Mapping[int, ClientState],
        ctx: ServerContext,
    ) -> tuple[list[Outcome], Aggregate | None]:
        """Train the cohort and reduce its weighted mean on the actors (see :mod:`fedloom.sim.reduce`).

        Returns the outcomes with every delta removed, in cohort order, and the round's
        aggregate (``None`` when no update came back). Each actor trains a contiguous run of
        the cohort balanced by cost; the partial sum travels actor to actor through the
        object store, so the driver receives one model's worth of bytes, not one per client.
        """
        cids = [int(c) for c in cohort]
        if not cids:
            return [], None
        shares = contiguous_shares(client_costs(algorithm, self.data, cids), self.workers)
        calls = self._start("train", algorithm, broadcast, cids, shares, client_states, ctx)
        replies = self._get([ref for _, _, ref in calls], ctx)
        results: list[Outcome] = [o for outcomes in replies for o in outcomes]  # runs are in cohort order
        updates = [o for o in results if isinstance(o, ClientUpdate)]
        if not updates:
            return results, None
        weight_of, total = weights(updates)
        acc: Any = None
        for positions, actor, _ in calls:
            pairs = [(cids[i], weight_of[cids[i]]) for i in positions if cids[i] in weight_of]
            acc = actor.reduce.remote(pairs, acc)
        delta = self._get(acc, ctx) if weight_of else None
        return results, finished(delta, broadcast.params.zeros_like(), len(weight_of), total)

    def close(self) -> None:
        """Stop the actors, and the local Ray instance if this executor started it."""
        for actor in getattr(self, "_actors", []):
            ray.kill(actor)
        self._actors = []
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
            self._started_ray = False
