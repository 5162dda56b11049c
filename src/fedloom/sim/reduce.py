"""Worker-side reduction of a round's updates, bit-identical to aggregating them in one place.

FedAvg's weighted mean is one left-to-right chain per tensor over the accepted
updates in cohort order (:meth:`~fedloom.core.params.Params.weighted_sum`). An
executor whose workers hold *contiguous* runs of the cohort can cut that chain
between them (:meth:`~fedloom.core.params.Params.accumulate`): worker 1 starts it
over its updates, worker 2 continues it from worker 1's partial sum, and so on,
and only the last partial sum -- one model's worth of bytes -- reaches the
driver. The coefficients ``w_i / sum_j w_j`` are those :func:`weighted_mean`
uses, known once every worker has reported its clients' weights. The result is
the ``Aggregate`` that ``FedAvg.aggregate`` would have returned, bit for bit.

This applies when the round's aggregation is exactly that weighted mean on the
updates as the clients produced them. The algorithm declares it: a method
``why_not_weighted_mean() -> str | None`` returning ``None`` promises that
``aggregate(updates)`` is :func:`weighted_mean` of the accepted updates (dropped
stragglers removed, cohort order) by each update's own ``weight`` -- whatever
weighting set that weight on the client side (example counts, or 1 for
``server.weighting = "uniform"``), since the reduction reads the same weights --
and an empty aggregate when every update was dropped. FedAvg and FedProx declare
it while their aggregator is :func:`weighted_mean`; an algorithm without the
method aggregates with its own rule. The round must also have no update
transforms (their ``decode`` runs per update on the server), no simulated attack
and no secure aggregation. :func:`not_reducible` says why a round cannot be
reduced; such rounds return every update.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedloom.algorithms.api import Aggregate, Algorithm, ClientUpdate
from fedloom.algorithms.stragglers import accepted
from fedloom.core.errors import UpdateError
from fedloom.core.params import Params
from fedloom.transforms.pipeline import Pipeline

__all__ = ["coefficients", "contiguous_shares", "finished", "not_reducible", "summary"]


def not_reducible(algorithm: Algorithm, pipeline: Pipeline) -> str | None:
    """Why this round's aggregation cannot be reduced on workers (``None``: it can)."""
    declared = getattr(algorithm, "why_not_weighted_mean", None)
    if not callable(declared):
        return f"{type(algorithm).__name__} aggregates with its own rule"
    reason = declared()
    if reason is not None:
        return str(reason)
    if pipeline.stages:
        return "update transforms decode each update on the server"
    return None


def summary(update: ClientUpdate) -> ClientUpdate:
    """``update`` without its delta (what a reducing worker sends back: counts, metrics, state)."""
    return ClientUpdate(
        client_id=update.client_id,
        delta=Params({}),
        weight=update.weight,
        num_examples=update.num_examples,
        num_steps=update.num_steps,
        metrics=update.metrics,
        extras={},
        client_state=update.client_state,
    )


def coefficients(updates: Sequence[ClientUpdate]) -> tuple[dict[int, float], float]:
    """``({client: w_i / W}, W)`` over the accepted updates, as :func:`weighted_mean` computes them."""
    kept = accepted(updates)
    if not kept:
        return {}, 0.0
    total = float(sum(u.weight for u in kept))
    if not total > 0:
        raise UpdateError(f"total aggregation weight is {total}; every update must have a positive weight")
    return {u.client_id: u.weight / total for u in kept}, total


def finished(delta: Params | None, zeros: Params, num_clients: int, total: float) -> Aggregate:
    """The round's ``Aggregate`` from the reduced sum (``None``: every update was a dropped straggler)."""
    if delta is None:
        return Aggregate(delta=zeros, num_clients=0, total_weight=0.0)
    return Aggregate(delta=delta, num_clients=num_clients, total_weight=total)


def contiguous_shares(costs: Sequence[int], workers: int) -> list[list[int]]:
    """Positions ``0..n-1`` cut into ``workers`` consecutive runs of about equal total cost.

    Run ``k`` ends where the running cost first reaches ``(k + 1) / workers`` of the
    total; every run is non-empty while there are items left. Deterministic.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    n, total = len(costs), float(sum(costs))
    shares: list[list[int]] = []
    start, running = 0, 0.0
    for k in range(workers):
        end = start
        goal = total * (k + 1) / workers
        left_after = workers - k - 1
        while end < n - left_after and (end == start or running + costs[end] / 2 <= goal):
            running += costs[end]
            end += 1
        if k == workers - 1:
            while end < n:
                running += costs[end]
                end += 1
        shares.append(list(range(start, end)))
        start = end
    return shares
