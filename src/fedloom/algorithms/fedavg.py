"""FedAvg (McMahan et al. 2017, arXiv 1602.05629), with the server optimiser as a parameter.

Each selected client runs local SGD from the global model ``w`` and returns
``delta_k = w_k - w`` with weight ``n_k`` (its example count; ``weighting =
"uniform"`` gives every client weight 1). The server forms
``delta = sum_k n_k delta_k / sum_k n_k`` and applies its optimiser to it:
``ServerSGD(lr=1)`` gives ``w <- w + delta``, i.e. classic FedAvg; other server
optimisers give FedAvgM / FedAdam / FedYogi / FedAdagrad (Reddi et al. 2021,
arXiv 2003.00295; see ``server_opt``).

With :class:`~fedloom.algorithms.stragglers.Stragglers`, some clients complete
only part of their local steps; ``drop=True`` excludes them from the mean (the
FedProx paper's FedAvg baseline), otherwise their partial work is averaged in.
A round whose every update was dropped leaves the server state unchanged.

:func:`plain_plan` (the client side as a :class:`~fedloom.algorithms.plan.LocalPlan`),
:func:`weighted_round` and :func:`apply_round` (the aggregation and server step) are
shared with FedProx and FedNova, which differ only in a gradient correction or in
the aggregation weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

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
from fedloom.algorithms.local import GradCorrection, LocalResult, LocalSGD
from fedloom.algorithms.plan import LocalPlan, run_plan
from fedloom.algorithms.requirements import UpdateRequirements
from fedloom.algorithms.server_opt import ServerOptimizer, ServerSGD
from fedloom.algorithms.stragglers import Stragglers, accepted, straggler_metrics
from fedloom.core.params import Params
from fedloom.data.datasets import ArrayDataset

__all__ = ["FedAvg", "apply_round", "empty_aggregate", "mean_refusal", "plain_plan", "weighted_round"]


@dataclass(frozen=True)
class FedAvg:
    """Federated averaging with a pluggable server optimiser.

    ``weighting`` sets each update's weight: its example count (``"examples"``)
    or 1 (``"uniform"``).
    """

    local: LocalSGD = field(default_factory=LocalSGD)
    server_optimizer: ServerOptimizer = field(default_factory=ServerSGD)
    stragglers: Stragglers = field(default_factory=Stragglers)
    aggregator: Aggregator = weighted_mean
    weighting: Weighting = "examples"

    @property
    def name(self) -> str:
        return "fedavg"

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
        """Local training from the broadcast; the update is the delta, weighted by ``weighting``."""
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

    def why_not_weighted_mean(self) -> str | None:
        """``None``: :meth:`aggregate` is the weighted mean of the accepted deltas by their ``weight``."""
        return mean_refusal(self.aggregator)

    def aggregate(self, updates: Sequence[ClientUpdate], ctx: ServerContext) -> Aggregate:
        return weighted_round(updates, self.aggregator)

    def server_update(self, state: ServerState, aggregate: Aggregate, ctx: ServerContext) -> ServerState:
        return apply_round(self.server_optimizer, state, aggregate, ctx)


def plain_plan(
    local: LocalSGD,
    stragglers: Stragglers,
    weighting: Weighting,
    broadcast: Broadcast,
    data: ArrayDataset,
    ctx: ClientContext,
    correction: GradCorrection | None = None,
) -> LocalPlan:
    """FedAvg's client side (shared with FedProx and FedNova): ``delta`` weighted by ``weighting``.

    The client runs its straggler plan's steps of ``local`` from the broadcast
    with ``correction``; a straggler whose work ``stragglers.drop`` discards does not train.
    """
    work = stragglers.plan(local.num_steps(len(data)), ctx)
    n = len(data)

    def finish(result: LocalResult) -> ClientUpdate:
        return ClientUpdate(
            client_id=ctx.client_id,
            delta=result.delta,
            weight=client_weight(weighting, n),
            num_examples=n,
            num_steps=result.num_steps,
            metrics=straggler_metrics(work, result),
        )

    return LocalPlan(
        start=broadcast.params,
        local=local,
        work=work,
        finish=finish,
        correction=correction,
        drop=work.straggler and stragglers.drop,
    )


def mean_refusal(aggregator: Aggregator) -> str | None:
    """Why aggregating with ``aggregator`` is not the plain weighted mean (``None``: it is).

    The weighted mean reads each update's ``weight``, which the client side set
    from the weighting (example counts or 1), so every weighting qualifies.
    """
    if aggregator is not weighted_mean:
        return "a robust aggregation rule needs every update in one place"
    return None


def empty_aggregate(updates: Sequence[ClientUpdate]) -> Aggregate:
    """The aggregate of a round whose every update was dropped: ``num_clients == 0``."""
    return Aggregate(delta=updates[0].delta.zeros_like(), num_clients=0, total_weight=0.0)


def weighted_round(updates: Sequence[ClientUpdate], aggregator: Aggregator = weighted_mean) -> Aggregate:
    """``aggregator`` (by default the example-weighted mean) over the accepted updates.

    Dropped stragglers are removed first.
    """
    kept = accepted(updates)
    if updates and not kept:
        return empty_aggregate(updates)
    delta, total = aggregator(kept)
    return Aggregate(delta=delta, num_clients=len(kept), total_weight=total)


def apply_round(
    optimizer: ServerOptimizer, state: ServerState, aggregate: Aggregate, ctx: ServerContext
) -> ServerState:
    """Apply the server optimiser to ``aggregate.delta``.

    An empty round (no client contributed) changes nothing but the round number,
    unless a DP stage released noise for it (a non-zero delta, see
    :func:`fedloom.transforms.dp.noised_mean`): that release is applied like any other.
    """
    if aggregate.num_clients == 0 and aggregate.delta.l2_norm() == 0:
        return ServerState(
            round=ctx.round, params=state.params, opt_state=state.opt_state, algo_state=state.algo_state
        )
    params, slots = optimizer.step(state.params, aggregate.delta, state.opt_state, ctx.round)
    return ServerState(round=ctx.round, params=params, opt_state=slots, algo_state=state.algo_state)
