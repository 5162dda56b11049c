"""Summing a round's updates where they are, bit-identical to aggregating them in one place.

FedAvg's weighted mean (:func:`~fedloom.algorithms.aggregate.weighted_mean`) is
one left-to-right chain per tensor over the accepted updates in cohort order,
``sum_i w_i * delta_i`` with each update's raw weight ``w_i``
(:meth:`~fedloom.core.params.Params.accumulate`), divided by the total weight
``W`` once at the end. No coefficient depends on ``W``, so an executor can run
that chain while the round is still training, and hand the runner the finished
``Aggregate`` instead of every delta:

* the parallel executor extends the chain in its main process as each client's
  outcome arrives, over the longest run of the cohort that has come back, so the
  sum overlaps the workers' training instead of following it;
* the Ray executor's actors train *contiguous* runs of the cohort and cut the
  chain between them: actor 1 starts it over its updates, actor 2 continues it
  from actor 1's partial sum, and only the last partial sum -- one model's worth
  of bytes -- reaches the driver.

Either way the result is the ``Aggregate`` that ``FedAvg.aggregate`` would have
returned, bit for bit.

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

__all__ = ["Chain", "contiguous_shares", "finished", "not_reducible", "summary", "weights"]


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


def weights(updates: Sequence[ClientUpdate]) -> tuple[dict[int, float], float]:
    """``({client: w_i}, W)`` over the accepted updates, as :func:`weighted_mean` reads them."""
    kept = accepted(updates)
    if not kept:
        return {}, 0.0
    return {u.client_id: u.weight for u in kept}, _total([u.weight for u in kept])


def _total(ws: Sequence[float]) -> float:
    total = float(sum(ws))
    if not total > 0:
        raise UpdateError(f"total aggregation weight is {total}; every update must have a positive weight")
    return total


def finished(delta: Params | None, zeros: Params, num_clients: int, total: float) -> Aggregate:
    """The round's ``Aggregate`` from the chained sum ``sum_i w_i * delta_i`` (``None``: every
    update was a dropped straggler), divided by ``total``."""
    if delta is None:
        return Aggregate(delta=zeros, num_clients=0, total_weight=0.0)
    return Aggregate(delta=delta / total, num_clients=num_clients, total_weight=total)


class Chain:
    """The weighted sum of a round's updates, extended in cohort order as outcomes arrive.

    :meth:`offer` places the outcome of cohort position ``i`` (an update or a
    failure, in any order); every time the next position in cohort order is
    present, its update joins the chain (a failure or a dropped straggler is
    skipped). :meth:`result` is the round's ``Aggregate`` once every position was
    offered (``like``, the broadcast, gives the shape of an empty round's zeros).
    The sum is this object's own memory: an offered delta may be overwritten once
    the chain has passed its position.
    """

    def __init__(self, size: int, like: Params) -> None:
        self._pending: dict[int, ClientUpdate | None] = {}
        self._next, self._size, self._like = 0, size, like
        self._acc: Params | None = None
        self._weights: list[float] = []

    def offer(self, position: int, outcome: object) -> None:
        self._pending[position] = outcome if isinstance(outcome, ClientUpdate) else None
        while self._next in self._pending:
            update = self._pending.pop(self._next)
            self._next += 1
            if update is None or not accepted([update]):
                continue
            self._acc = Params.accumulate(self._acc, [update.delta], [update.weight])
            self._weights.append(update.weight)

    @property
    def passed(self) -> int:
        """How many positions from the start of the cohort the chain has passed (their deltas are free)."""
        return self._next

    def result(self) -> Aggregate:
        if self._next != self._size:
            raise RuntimeError(f"the chain holds {self._next} of {self._size} cohort positions")
        if self._acc is None:
            return finished(None, self._like.zeros_like(), 0, 0.0)
        return finished(self._acc, self._like, len(self._weights), _total(self._weights))


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
