"""The algorithm API: explicit state in, new state out.

A federated algorithm is four pure functions over explicit, immutable state
(the FedJAX shape; see STYLE.md):

``server_init(params) -> ServerState``
    the state before round 1.
``broadcast(state) -> Broadcast``
    what the server sends to a selected client (the global parameters plus any
    algorithm extras, e.g. SCAFFOLD's server control variate).
``client_update(workspace, broadcast, client_state, data, ctx) -> ClientUpdate``
    local training on one client's data; returns the model delta, its weight,
    step count, metrics and the client's new persistent state (if any).
``aggregate(updates, ctx) -> Aggregate`` and ``server_update(state, aggregate, ctx) -> ServerState``
    combine the round's (already decoded) updates and apply them.

Every runtime -- the sequential, parallel and vectorised simulation executors,
Ray and the gRPC deployment -- calls exactly these functions, so an experiment
proven in simulation deploys unchanged. Nothing here knows which runtime calls it.
Two optional declarations let a runtime do the same work faster without knowing
the algorithm: ``local_plan`` (the client update as a local-training plan, which
``client_update`` itself runs; :mod:`fedloom.algorithms.plan`), batched by the
vectorised executor, and ``why_not_weighted_mean`` (``None`` when ``aggregate``
is the weighted mean of the deltas; :mod:`fedloom.sim.reduce`), reduced on Ray's workers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from fedloom.core.params import Params
from fedloom.core.rng import torch_rng
from fedloom.data.datasets import ArrayDataset

if TYPE_CHECKING:
    from fedloom.algorithms.local import LocalOptimizer, TrainFn
    from fedloom.metrics import Metric

__all__ = [
    "Aggregate",
    "Algorithm",
    "Broadcast",
    "ClientContext",
    "ClientState",
    "ClientUpdate",
    "ServerContext",
    "ServerState",
    "Workspace",
]


@dataclass(frozen=True)
class ServerState:
    """Everything the server needs to continue a run after ``round`` completed rounds.

    ``opt_state`` holds the server optimiser's slots (e.g. momentum), ``algo_state``
    algorithm-specific tensors (e.g. SCAFFOLD's server control variate). Both are
    checkpointed with the parameters, so resume is exact.
    """

    round: int
    params: Params
    opt_state: Mapping[str, Params] = field(default_factory=dict)
    algo_state: Mapping[str, Params] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientState:
    """A client's persistent state across rounds (e.g. SCAFFOLD's control variate)."""

    values: Mapping[str, Params]


@dataclass(frozen=True)
class Broadcast:
    """What the server sends to each selected client for one round."""

    round: int
    params: Params
    extras: Mapping[str, Params] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientUpdate:
    """The result of one client's local work.

    ``delta`` is ``trained - global``. ``weight`` is the aggregation weight (the
    number of local examples for FedAvg). ``extras`` carries algorithm-specific
    tensors to the server (e.g. SCAFFOLD's control-variate delta).
    """

    client_id: int
    delta: Params
    weight: float
    num_examples: int
    num_steps: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    extras: Mapping[str, Params] = field(default_factory=dict)
    client_state: ClientState | None = None


@dataclass(frozen=True)
class Aggregate:
    """The combined updates of one round."""

    delta: Params
    num_clients: int
    total_weight: float
    extras: Mapping[str, Params] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientContext:
    """Coordinates of one client's work: every random draw derives from them.

    ``optimizer_state`` is the local optimiser's state this client kept from its
    previous round (only for a task whose ``LocalOptimizer.keep_state`` is set);
    local training leaves the new state in ``outbox["optimizer"]``, which
    :func:`fedloom.algorithms.local.client_update_with_state` moves into the
    update's client state.
    """

    seed: int
    round: int
    client_id: int
    optimizer_state: Params | None = None
    outbox: dict[str, Params] = field(default_factory=dict, compare=False, repr=False)

    def rng(self, purpose: str) -> torch.Generator:
        return torch_rng(self.seed, purpose, round=self.round, client=self.client_id)


@dataclass(frozen=True)
class ServerContext:
    """Coordinates of a round on the server; ``population`` is the number of registered clients."""

    seed: int
    round: int
    population: int


class Workspace:
    """A reusable model instance and the task's client-side training recipe.

    Runtimes build one per worker from the task and reuse it across clients and
    rounds, loading the broadcast parameters into it; algorithms never keep state
    in it between calls. Besides the module it holds what the task chose:
    ``loss_fn(outputs, targets) -> scalar`` (cross-entropy by default), the local
    ``optimizer`` (``None``: fedloom's plain SGD), a user-written ``train_fn``
    (``None``: fedloom's own loop), the evaluation ``metrics`` (``None``: accuracy)
    and the ``device``.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        *,
        optimizer: LocalOptimizer | None = None,
        train_fn: TrainFn | None = None,
        metrics: Mapping[str, Metric] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.module = module.to(self.device)
        self.loss_fn = loss_fn if loss_fn is not None else torch.nn.CrossEntropyLoss()
        self.optimizer = optimizer
        self.train_fn = train_fn
        if metrics is None:
            from fedloom.metrics import accuracy

            metrics = {"accuracy": accuracy}
        self.metrics: Mapping[str, Metric] = dict(metrics)
        self.trainable = [name for name, p in module.named_parameters() if p.requires_grad]


@runtime_checkable
class Algorithm(Protocol):
    """The four pure functions every runtime drives (see the module docstring)."""

    @property
    def name(self) -> str: ...

    def server_init(self, params: Params) -> ServerState: ...

    def broadcast(self, state: ServerState) -> Broadcast: ...

    def client_update(
        self,
        workspace: Workspace,
        broadcast: Broadcast,
        client_state: ClientState | None,
        data: ArrayDataset,
        ctx: ClientContext,
    ) -> ClientUpdate: ...

    def aggregate(self, updates: Sequence[ClientUpdate], ctx: ServerContext) -> Aggregate: ...

    def server_update(self, state: ServerState, aggregate: Aggregate, ctx: ServerContext) -> ServerState: ...
