"""Krum, Multi-Krum (Blanchard et al. 2017, NeurIPS, arXiv 1703.02757) and Bulyan (El Mhamdi et al. 2018, arXiv 1802.07927).

Krum scores each update by the sum of squared distances to its ``n - f - 2``
nearest other updates and returns the lowest-scoring one; Multi-Krum averages
the ``m`` lowest-scoring ones (scores computed once, as in the paper). Bulyan
selects ``theta = n - 2f`` updates by repeated Krum (re-scoring the remaining
set each time), then per coordinate averages the ``beta = theta - 2f`` selected
values closest to the selected median.

Every rule ignores client weights (a weight is the client's own claim) and
reports the sum of all weights as ``total_weight``. Ties in scores go to the
lower position in ``updates`` (callers pass them sorted by client id).

Notes
-----
Krum needs ``n >= 2f + 3`` and Bulyan ``n >= 4f + 3``; both raise
:class:`~fedloom.core.errors.UpdateError` otherwise. With ``f`` Byzantine
updates Krum's choice is a benign update or one within the benign cloud's
distance scale; it is not a mean, so it wastes the other benign updates'
variance reduction (Multi-Krum with ``m = n - f`` recovers most of it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedloom.aggregators.coordinatewise import median_rows
from fedloom.aggregators.stacking import check_round, pairwise_sq_distances, stack, total_weight, unstack
from fedloom.algorithms.api import ClientUpdate
from fedloom.core.errors import UpdateError
from fedloom.core.params import Params

__all__ = ["bulyan", "krum", "krum_scores", "multi_krum"]


def krum_scores(dist: torch.Tensor, f: int) -> torch.Tensor:
    """``score_i = sum of the k smallest D[i, j], j != i``, ``k = max(1, n - f - 2)`` (capped at n - 1).

    ``dist`` is an ``(n, n)`` squared-distance matrix; returns ``(n,)`` float64.
    """
    n = dist.shape[0]
    if n == 1:
        return torch.zeros(1, dtype=torch.float64)
    k = min(max(n - f - 2, 1), n - 1)
    off = dist.clone()
    off.fill_diagonal_(float("inf"))
    nearest, _ = torch.topk(off, k, dim=1, largest=False)
    return nearest.sum(dim=1)


def _check_f(updates: Sequence[ClientUpdate], f: int, need: int, rule: str) -> None:
    if f < 0:
        raise ValueError(f"{rule} f must be >= 0, got {f}")
    if len(updates) < need:
        raise UpdateError(f"{rule}(f={f}) needs at least {need} client updates, got {len(updates)}")


def _lowest(scores: torch.Tensor, m: int) -> torch.Tensor:
    order = torch.sort(scores, stable=True).indices  # stable: ties to the lower index
    return order[:m]


def krum(updates: Sequence[ClientUpdate], *, f: int) -> tuple[Params, float]:
    """The single update with the lowest Krum score (``n >= 2f + 3``)."""
    check_round(updates, rule="krum")
    _check_f(updates, f, 2 * f + 3, "krum")
    x = stack(updates)
    best = int(_lowest(krum_scores(pairwise_sq_distances(x), f), 1)[0])
    return updates[best].delta, total_weight(updates)


def multi_krum(updates: Sequence[ClientUpdate], *, f: int, m: int) -> tuple[Params, float]:
    """Uniform mean of the ``m`` updates with the lowest Krum scores (``n >= 2f + 3``, ``1 <= m <= n``)."""
    check_round(updates, rule="multi_krum")
    _check_f(updates, f, 2 * f + 3, "multi_krum")
    if not 1 <= m <= len(updates):
        raise ValueError(f"multi_krum m must be in [1, {len(updates)}], got {m}")
    x = stack(updates)
    chosen = _lowest(krum_scores(pairwise_sq_distances(x), f), m)
    return unstack(x[chosen].mean(dim=0), updates[0].delta), total_weight(updates)


def bulyan(updates: Sequence[ClientUpdate], *, f: int) -> tuple[Params, float]:
    """Bulyan over Krum (``n >= 4f + 3``); see the module docstring."""
    check_round(updates, rule="bulyan")
    _check_f(updates, f, 4 * f + 3, "bulyan")
    x = stack(updates)
    dist = pairwise_sq_distances(x)
    n = len(updates)
    theta, beta = n - 2 * f, n - 4 * f
    remaining = list(range(n))
    selected: list[int] = []
    for _ in range(theta):
        idx = torch.tensor(remaining)
        scores = krum_scores(dist[idx][:, idx], f)
        pick = remaining[int(_lowest(scores, 1)[0])]
        selected.append(pick)
        remaining.remove(pick)
    sel = x[torch.tensor(selected)]  # (theta, d)
    med = median_rows(sel)  # (d,)
    closest = torch.argsort((sel - med).abs(), dim=0, stable=True)[:beta]  # (beta, d)
    out = torch.gather(sel, 0, closest).mean(dim=0)
    return unstack(out, updates[0].delta), total_weight(updates)
