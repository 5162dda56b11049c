"""The Ray executor: the parallel executor's design on Ray actors, for a machine or a cluster.

Needs the ``ray`` extra (``pip install 'fedloom[ray]'``). At construction the
workspace, the federated dataset and the pipeline are put in Ray's object
store once (``ray.put``); ``workers`` actors are started, each with one torch
thread, and fetch them once. Each round the broadcast is put once and every
actor gets its LPT share of the cohort (the same split as the parallel
executor) plus those clients' states; outcomes come back in cohort order.
Every client runs :func:`~fedloom.sim.executor.run_client` with one torch
thread, so results equal ``SequentialExecutor(threads=1)``'s bit for bit.

If Ray is not running yet, a local instance is started
(``ray.init(num_cpus=workers)``); to use a cluster, connect first
(``ray.init(address="auto")`` or set ``RAY_ADDRESS``) -- see the README. An
actor that dies raises :class:`~fedloom.sim.executor.ExecutorError`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import ray
import torch

from fedloom.algorithms.api import Algorithm, Broadcast, ClientState, ServerContext, Workspace
from fedloom.data.federated import FederatedDataset
from fedloom.sim.executor import ExecutorError, Outcome, client_costs, lpt_assign, run_client
from fedloom.transforms.pipeline import Pipeline

__all__ = ["RayExecutor"]


class _ClientWorker:
    """One actor: a private workspace and the shared data, trained with one torch thread."""

    def __init__(self, workspace: Workspace, data: FederatedDataset, pipeline: Pipeline) -> None:
        torch.set_num_threads(1)
        self.workspace, self.data, self.pipeline = workspace, data, pipeline

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
        bref, aref = ray.put(broadcast), ray.put(algorithm)
        calls = []
        for actor, positions in zip(self._actors, shares, strict=True):
            if positions:
                mine = [cids[i] for i in positions]
                states = {c: client_states[c] for c in mine if c in client_states}
                calls.append((positions, actor.run.remote(aref, bref, mine, states, ctx)))
        results: list[Outcome | None] = [None] * len(cids)
        try:
            replies = ray.get([ref for _, ref in calls])
        except ray.exceptions.RayActorError as exc:
            self.close()
            raise ExecutorError(f"round {ctx.round}: a Ray actor died: {exc}") from exc
        except ray.exceptions.RayTaskError as exc:
            raise ExecutorError(f"round {ctx.round}: a Ray actor failed: {exc}") from exc
        for (positions, _), outcomes in zip(calls, replies, strict=True):
            for pos, outcome in zip(positions, outcomes, strict=True):
                results[pos] = outcome
        return [r for r in results if r is not None]

    def close(self) -> None:
        """Stop the actors, and the local Ray instance if this executor started it."""
        for actor in getattr(self, "_actors", []):
            ray.kill(actor)
        self._actors = []
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
            self._started_ray = False
