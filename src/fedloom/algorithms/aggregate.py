"""Aggregation rules as plain functions over client updates."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

from fedloom.algorithms.api import ClientUpdate
from fedloom.core.errors import UpdateError
from fedloom.core.params import Params

__all__ = ["Aggregator", "Weighting", "client_weight", "weighted_mean"]

#: How a client's update counts in the mean: ``"examples"`` by its example count
#: ``n_k`` (FedAvg, arXiv 1602.05629), ``"uniform"`` equally (``1 / |S|``, as in
#: Algorithm 2 of Reddi et al., arXiv 2003.00295).
Weighting = Literal["examples", "uniform"]


def client_weight(weighting: Weighting, num_examples: int) -> float:
    """The aggregation weight of a client that trained on ``num_examples`` examples."""
    if weighting == "examples":
        return float(num_examples)
    if weighting == "uniform":
        return 1.0
    raise ValueError(f"weighting must be 'examples' or 'uniform', got {weighting!r}")


#: A rule combining a round's updates into ``(delta, total_weight)``; ``weighted_mean`` is the default.
Aggregator = Callable[[Sequence[ClientUpdate]], tuple[Params, float]]


def weighted_mean(updates: Sequence[ClientUpdate]) -> tuple[Params, float]:
    """``(sum_i w_i * delta_i) / sum_i w_i`` in the order given, and ``sum_i w_i``.

    The weighted sum is one left-to-right chain per tensor over the updates in
    the order given (:meth:`Params.weighted_sum` with the raw weights ``w_i``),
    divided by the total weight once at the end. Because no coefficient depends on
    the total, the chain can be extended as each update arrives, and an executor
    can sum a round while its clients are still training (:mod:`fedloom.sim.reduce`).
    The order of ``updates`` fixes the floating-point summation order: callers pass
    them in cohort order for reproducibility.
    """
    if not updates:
        raise UpdateError("cannot aggregate an empty round: no client update was accepted")
    total = float(sum(u.weight for u in updates))
    if not total > 0:
        raise UpdateError(f"total aggregation weight is {total}; every update must have a positive weight")
    return Params.weighted_sum([u.delta for u in updates], [u.weight for u in updates]).div_(total), total
