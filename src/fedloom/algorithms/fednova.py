"""FedNova (Wang et al. 2020, arXiv 2007.07481): normalised averaging of heterogeneous local work.

Clients that take more local steps move further, and FedAvg's plain average lets
them pull the global model towards their own optimum (objective inconsistency).
FedNova divides each client's change by its amount of local work before
averaging and rescales by the effective number of steps. With plain local SGD
the work measure is ``a_i = tau_i``, the number of local steps, so with
``p_i = n_i / sum_j n_j``:

    d_i = delta_i / tau_i                      (normalised update)
    tau_eff = sum_i p_i tau_i
    delta = tau_eff * sum_i p_i d_i            (then the server optimiser, lr 1 = the paper)

When every ``tau_i`` is equal this is FedAvg's weighted mean exactly: like
:func:`~fedloom.algorithms.aggregate.weighted_mean` the sum is taken with raw
weights and divided by ``sum_j n_j`` at the end, and the weight
``n_i * tau_eff / tau_i`` is computed as ``n_i * ((sum_j n_j tau_j) / (sum_j n_j *
tau_i))``, whose ratio is exactly 1 then. Step counts differ through
client sizes (a fixed number of epochs), ``client.steps`` or stragglers' partial work.
``weighting = "uniform"`` sets every ``n_i`` to 1 (``p_i = 1 / |S|``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from fedloom.algorithms.aggregate import Weighting
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
from fedloom.algorithms.fedavg import apply_round, empty_aggregate, plain_plan
from fedloom.algorithms.local import LocalSGD
from fedloom.algorithms.plan import LocalPlan, run_plan
from fedloom.algorithms.requirements import UpdateRequirements
from fedloom.algorithms.server_opt import ServerOptimizer, ServerSGD
from fedloom.algorithms.stragglers import Stragglers, accepted
from fedloom.core.errors import UpdateError
from fedloom.core.params import Params
from fedloom.data.datasets import ArrayDataset

__all__ = ["FedNova", "nova_coefficients"]


def nova_coefficients(weights: Sequence[float], steps: Sequence[int]) -> list[float]:
    """``n_i * tau_eff / tau_i`` for each client, to be summed and divided by ``sum_j n_j``
    (see the module docstring)."""
    if not weights:
        raise UpdateError("cannot aggregate an empty round: no client update was accepted")
    total = float(sum(weights))
    if not total > 0:
        raise UpdateError(f"total aggregation weight is {total}; every update must have a positive weight")
    if min(steps) < 1:
        raise UpdateError(f"FedNova needs at least one local step per client, got step counts {list(steps)}")
    work = float(sum(w * t for w, t in zip(weights, steps, strict=True)))  # sum_j n_j tau_j
    return [w * (work / (total * t)) for w, t in zip(weights, steps, strict=True)]


@dataclass(frozen=True)
class FedNova:
    """FedAvg's local training (and stragglers); step-normalised aggregation."""

    local: LocalSGD = field(default_factory=LocalSGD)
    server_optimizer: ServerOptimizer = field(default_factory=ServerSGD)
    stragglers: Stragglers = field(default_factory=Stragglers)
    weighting: Weighting = "examples"

    @property
    def name(self) -> str:
        return "fednova"

    def update_requirements(self) -> UpdateRequirements:
        """No extras; at least one local step (the update is divided by its step count)."""
        return UpdateRequirements(min_steps=1)

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
        """FedAvg's client side: the update already reports ``tau_i`` as ``num_steps``."""
        return plain_plan(self.local, self.stragglers, self.weighting, broadcast, data, ctx)

    def client_update(
        self,
        workspace: Workspace,
        broadcast: Broadcast,
        client_state: ClientState | None,
        data: ArrayDataset,
        ctx: ClientContext,
    ) -> ClientUpdate:
        return run_plan(workspace, self.local_plan(workspace, broadcast, client_state, data, ctx), data, ctx)

    def aggregate(self, updates: Sequence[ClientUpdate], ctx: ServerContext) -> Aggregate:
        kept = accepted(updates)
        if updates and not kept:
            return empty_aggregate(updates)
        coeffs = nova_coefficients([u.weight for u in kept], [u.num_steps for u in kept])
        total = float(sum(u.weight for u in kept))
        delta = Params.weighted_sum([u.delta for u in kept], coeffs).div_(total)
        return Aggregate(delta=delta, num_clients=len(kept), total_weight=total)

    def server_update(self, state: ServerState, aggregate: Aggregate, ctx: ServerContext) -> ServerState:
        return apply_round(self.server_optimizer, state, aggregate, ctx)
