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

from fedloom.algorithms.aggregate import Aggregator, Weighting, weighted_mean
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
from fedloom.algorithms.fedavg import apply_round, mean_refusal, plain_plan, weighted_round
from fedloom.algorithms.local import GradCorrection, LocalSGD
from fedloom.algorithms.plan import LocalPlan, run_plan
from fedloom.algorithms.requirements import UpdateRequirements
from fedloom.algorithms.server_opt import ServerOptimizer, ServerSGD
from fedloom.algorithms.stragglers import Stragglers
from fedloom.core.params import Params
from fedloom.data.datasets import ArrayDataset

__all__ = ["FedProx", "ProximalCorrection"]


class ProximalCorrection:
    """``g <- g + mu * (w - w_anchor)`` for every trainable tensor (the proximal term's gradient).

    ``anchor`` is ``w_t``'s trainable tensors in ``workspace.trainable`` order,
    shaped like the parameters or broadcastable to them: :meth:`stack` gives a
    block of clients one anchor of shape ``(1, *shape)`` (or ``(K, *shape)`` if
    their anchors differ) for their stacked ``(K, *shape)`` parameters.
    """

    name = "FedProx's proximal term"

    def __init__(self, mu: float, anchor: list[torch.Tensor]) -> None:
        self.mu = mu
        # On any device: copied to the parameters' device at the first call, so a cohort's plans
        # share the broadcast's tensors until a client trains.
        self.anchor = anchor
        self._moved: list[torch.Tensor] | None = None

    def __call__(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        if self._moved is None:
            self._moved = [a.to(p.device) for a, p in zip(self.anchor, params, strict=True)]
        # grads += mu * (params - anchor); the differences are fresh tensors, so nothing is aliased.
        diffs = torch._foreach_sub(params, self._moved)
        torch._foreach_add_(grads, diffs, alpha=self.mu)

    def stack(self, block: Sequence[GradCorrection], device: torch.device) -> GradCorrection | str:
        """One correction for a block of clients' stacked tensors (see the class docstring)."""
        mine = [c for c in block if isinstance(c, ProximalCorrection)]
        if len(mine) != len(block):
            return "a block mixes FedProx's proximal term with other corrections"
        if any(c.mu != self.mu for c in mine):
            return "FedProx clients of one block have different mu"
        if all(len(c.anchor) == len(self.anchor) and all(map(_same, c.anchor, self.anchor)) for c in mine):
            # Every client is pulled to the same w_t: one copy broadcasts over the client axis.
            return ProximalCorrection(self.mu, [a.to(device).unsqueeze(0) for a in self.anchor])
        return ProximalCorrection(
            self.mu, [torch.stack(ts).to(device) for ts in zip(*(c.anchor for c in mine), strict=True)]
        )


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and bool(torch.equal(a, b)))


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

    def local_plan(
        self,
        workspace: Workspace,
        broadcast: Broadcast,
        client_state: ClientState | None,
        data: ArrayDataset,
        ctx: ClientContext,
    ) -> LocalPlan:
        """FedAvg's plan with the proximal term (none when ``mu`` is 0)."""
        correction = None
        if self.mu > 0:
            anchor = [broadcast.params[n] for n in workspace.trainable]
            correction = ProximalCorrection(self.mu, anchor)
        return plain_plan(self.local, self.stragglers, self.weighting, broadcast, data, ctx, correction)

    def client_update(
        self,
        workspace: Workspace,
        broadcast: Broadcast,
        client_state: ClientState | None,
        data: ArrayDataset,
        ctx: ClientContext,
    ) -> ClientUpdate:
        return run_plan(workspace, self.local_plan(workspace, broadcast, client_state, data, ctx), data, ctx)

    def why_not_weighted_mean(self) -> str | None:
        """``None``: :meth:`aggregate` is the weighted mean of the accepted deltas by their ``weight``."""
        return mean_refusal(self.aggregator)

    def aggregate(self, updates: Sequence[ClientUpdate], ctx: ServerContext) -> Aggregate:
        return weighted_round(updates, self.aggregator)

    def server_update(self, state: ServerState, aggregate: Aggregate, ctx: ServerContext) -> ServerState:
        return apply_round(self.server_optimizer, state, aggregate, ctx)
