"""Coordinate-wise robust statistics: median and trimmed mean (Yin et al. 2018, arXiv 1803.01498).

Both have the signature of :func:`~fedloom.algorithms.aggregate.weighted_mean`
(``updates -> (delta, total_weight)``) once their options are bound, and both
*ignore the client weights*: a weight is a client's own claim, and letting it
move a robust statistic would hand an attacker a lever. ``total_weight`` is the
sum of all weights, as for the mean.

Notes
-----
Breakdown. The coordinate-wise median stays inside the range of the benign
values in every coordinate while fewer than half of the updates are
adversarial (``f <= ceil(n/2) - 1``); the ``beta``-trimmed mean does while
``f <= floor(beta * n)``. Neither bounds the *direction* of the result: in high
dimension ALIE-style attacks (arXiv 1902.06156) shift every coordinate within
its benign spread.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedloom.aggregators.stacking import check_round, stack, total_weight, unstack
from fedloom.algorithms.api import ClientUpdate
from fedloom.core.params import Params

__all__ = ["coordinate_median", "median_rows", "trimmed_mean", "trimmed_mean_rows"]


def median_rows(x: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median of the ``n`` rows of ``x`` ``(n, d) -> (d,)``; mean of the middle two if n is even."""
    s, _ = torch.sort(x, dim=0)
    n = x.shape[0]
    if n % 2:
        return s[n // 2]
    return (s[n // 2 - 1] + s[n // 2]) / 2


def trimmed_mean_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """Coordinate-wise mean after dropping the ``k`` largest and ``k`` smallest values ``(n, d) -> (d,)``."""
    s, _ = torch.sort(x, dim=0)
    return s[k : x.shape[0] - k].mean(dim=0)


def coordinate_median(updates: Sequence[ClientUpdate]) -> tuple[Params, float]:
    """Coordinate-wise median of the deltas (weights ignored) and the total weight."""
    check_round(updates, rule="coordinate_median")
    return unstack(median_rows(stack(updates)), updates[0].delta), total_weight(updates)


def trimmed_mean(updates: Sequence[ClientUpdate], *, beta: float) -> tuple[Params, float]:
    """Coordinate-wise ``beta``-trimmed mean: drop ``floor(beta * n)`` values at each end per coordinate.

    ``beta`` in ``[0, 0.5)``; raises :class:`UpdateError` when nothing would remain.
    """
    if not 0 <= beta < 0.5:
        raise ValueError(f"trimmed_mean beta must be in [0, 0.5), got {beta}")
    check_round(updates, rule="trimmed_mean")
    n = len(updates)
    k = math.floor(beta * n + 1e-9)
    check_round(updates, min_clients=2 * k + 1, rule=f"trimmed_mean(beta={beta})")
    return unstack(trimmed_mean_rows(stack(updates), k), updates[0].delta), total_weight(updates)
