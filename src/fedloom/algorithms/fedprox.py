"""FedProx (Li et al. 2020, arXiv 1812.06127): FedAvg with a proximal term in local training.

Client ``k`` approximately minimises

    h_k(w) = F_k(w) + mu/2 * ||w - w_t||^2

from the global model ``w_t`` (fixed for the round), by local SGD on
``grad F_k(w) + mu * (w - w_t)``. Aggregation and the server step are FedAvg's
(example-weighted mean of deltas, then the server optimiser). Systems
heterogeneity: stragglers' partial work is accepted, as in the paper, so the
proximal term is what keeps their (and everyone's) local models near ``w_t``.
With ``mu = 0`` and no stragglers FedProx is FedAvg, bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from fedloom.algorithms.aggregate import Aggregator, Weighting, client_weight, weighted_mean
from fedloom.algorithms.api import (
    Aggregate,
    Broadcast,
    ClientContext,
    ClientState,
    ClientUpdate,
    ServerContext,
    ServerState,
    Workspace,
)
from fedloom.algorithms.fedavg import apply_round, weighted_round
from fedloom.algorithms.local import LocalSGD
from fedloom.algorithms.requirements import UpdateRequirements
from fedloom.algorithms.server_opt import ServerOptimizer, ServerSGD
from fedloom.algorithms.stragglers import Stragglers, dropped_update, straggler_metrics, train_with_stragglers
from fedloom.core.params import Params
from fedloom.data.datasets import ArrayDataset

__all__ = ["FedProx", "ProximalCorrection"]


class ProximalCorrection:
    """``g <- g + mu * (w - w_anchor)`` for every trainable tensor (the proximal term's gradient)."""

    name = "FedProx's proximal term"

    def __init__(self, mu: float, anchor: list[torch.Tensor]) -> None:
        self.mu = mu
        self.anchor = anchor  # w_t's trainable tensors, in workspace.trainable order

    def __call__(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        # grads += mu * (params - anchor); the differences are fresh tensors, so nothing is aliased.
        diffs = torch._foreach_sub(params, self.anchor)
        torch._foreach_add_(grads, diffs, alpha=self.mu)


@dataclass(frozen=True)
class FedProx:
    """FedAvg's aggregation and server step; local SGD with the proximal term ``mu``."""

    local: LocalSGD = field(default_factory=LocalSGD)
    mu: float = 0.01
    server_optimizer: ServerOptimizer = field(default_factory=ServerSGD)
    stragglers: Stragglers = field(default_factory=Stragglers)
    aggregator: Aggregator = weighted_mean
    weighting: Weighting = "examples"

    def __post_init__(self) -> None:
        if not self.mu >= 0:
            raise ValueError(f"FedProx.mu must be >= 0, got {self.mu}")
        if self.stragglers.drop:
            raise ValueError("FedProx accepts stragglers' partial work; use FedAvg to drop stragglers")

    @property
    def name(self) -> str:
        return "fedprox"

    def update_requirements(self) -> UpdateRequirements:
        """No extras, any step count."""
        return UpdateRequirements()

    def server_init(self, params: Params) -> ServerState:
        return ServerState(round=0, params=params, opt_state=self.server_optimizer.init(params))

    def broadcast(self, state: ServerState) -> Broadcast:
        return Broadcast(round=state.round + 1, params=state.params)

    def client_update(
        self,
        workspace: Workspace,
        broadcast: Broadcast,
        client_state: ClientState | None,
        data: ArrayDataset,
        ctx: ClientContext,
    ) -> ClientUpdate:
        correction = None
        if self.mu > 0:
            anchor = [broadcast.params[n].to(workspace.device) for n in workspace.trainable]
            correction = ProximalCorrection(self.mu, anchor)
        plan, result = train_with_stragglers(
            workspace, broadcast.params, data, self.local, self.stragglers, ctx, correction=correction
        )
        if result is None:  # unreachable while __post_init__ forbids drop; kept total for safety
            return dropped_update(ctx, broadcast.params)
        return ClientUpdate(
            client_id=ctx.client_id,
            delta=result.delta,
            weight=client_weight(self.weighting, len(data)),
            num_examples=len(data),
            num_steps=result.num_steps,
            metrics=straggler_metrics(plan, result),
        )

    def aggregate(self, updates: Sequence[ClientUpdate], ctx: ServerContext) -> Aggregate:
        return weighted_round(updates, self.aggregator)

    def server_update(self, state: ServerState, aggregate: Aggregate, ctx: ServerContext) -> ServerState:
        return apply_round(self.server_optimizer, state, aggregate, ctx)
