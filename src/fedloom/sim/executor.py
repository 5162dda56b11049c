"""Executors: run one round's client updates. The sequential executor is the reference.

An executor receives the round's broadcast and cohort and returns one outcome
per client, in cohort order: a :class:`ClientUpdate` (already passed through the
client side of the transform pipeline) or a :class:`ClientFailure`, an error
value the runner filters out before aggregation. Faster executors must return
the same outcomes as :class:`SequentialExecutor`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from fedloom.algorithms.api import (
    Algorithm,
    Broadcast,
    ClientContext,
    ClientState,
    ClientUpdate,
    ServerContext,
    Workspace,
)
from fedloom.core.errors import FedloomError, TrainingError
from fedloom.data.federated import FederatedDataset
from fedloom.transforms.pipeline import Pipeline

__all__ = ["ClientFailure", "Executor", "Outcome", "SequentialExecutor"]


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


class SequentialExecutor:
    """Trains the cohort one client after another in this process, reusing one workspace."""

    def __init__(self, workspace: Workspace, data: FederatedDataset, pipeline: Pipeline) -> None:
        self.workspace = workspace
        self.data = data
        self.pipeline = pipeline

    def run_round(
        self,
        algorithm: Algorithm,
        broadcast: Broadcast,
        cohort: Sequence[int],
        client_states: Mapping[int, ClientState],
        ctx: ServerContext,
    ) -> list[Outcome]:
        return [
            run_client(
                self.workspace, self.data, self.pipeline, algorithm, broadcast, int(cid), client_states, ctx
            )
            for cid in cohort
        ]


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
        update = algorithm.client_update(
            workspace, broadcast, client_states.get(cid), data.client_data(cid), cctx
        )
        return pipeline.client(update, ctx)
    except TrainingError as exc:
        return ClientFailure(cid, str(exc), diverged=True)
    except FedloomError as exc:
        return ClientFailure(cid, str(exc))
