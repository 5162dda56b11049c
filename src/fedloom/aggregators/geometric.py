"""Geometric median by RFA's smoothed Weiszfeld (Pillutla, Kakade & Harchaoui 2019, arXiv 1912.13445), and norm bounding.

``geometric_median`` approximately minimises ``g(z) = sum_i a_i ||z - x_i||``
with ``a_i = w_i / sum_j w_j`` (RFA *uses* the client weights) by the
iteration ``z <- sum_i b_i x_i / sum_i b_i``, ``b_i = a_i / max(nu, ||z - x_i||)``,
starting from the weighted mean and stopping when a step moves ``z`` by at
most ``tol * (1 + ||z||)`` or after ``max_iter`` steps. ``nu > 0`` smooths the
non-differentiable points (a ``z`` landing on an ``x_i``).

The step of Weiszfeld's iteration is the gradient of ``g`` divided by
``sum_i b_i``, so a small step means a small gradient: the iterate is at a
stationary point of the convex ``g``. A test on the objective's improvement
instead stops far too early, because ``g`` is flat near its minimum (an
improvement of ``1e-6 * g`` still leaves ``z`` about ``1e-3`` away).

``norm_bounded_mean`` clips each delta to L2 norm ``bound`` and takes the
weighted mean (Sun et al. 2019, "Can you really backdoor federated
learning?", arXiv 1911.07963).

Notes
-----
The geometric median has breakdown point 1/2 *in weight*: an attacker
controlling less than half of the total weight moves it by a bounded amount,
but one who inflates its own weight gains influence, so pair it with a server
that sets or caps weights. Norm bounding is not robust in the breakdown sense:
it limits each attacker to ``bound`` of influence, which defeats boosted
(model-replacement) updates but not many small coordinated ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from fedloom.aggregators.stacking import check_round, stack, total_weight, unstack
from fedloom.algorithms.aggregate import weighted_mean
from fedloom.algorithms.api import ClientUpdate
from fedloom.core.params import Params

__all__ = ["geometric_median", "norm_bounded_mean", "weiszfeld"]


def weiszfeld(
    x: torch.Tensor, alphas: torch.Tensor, *, nu: float = 1e-6, max_iter: int = 1000, tol: float = 1e-10
) -> tuple[torch.Tensor, int]:
    """Smoothed Weiszfeld on rows ``x`` ``(n, d)`` with weights ``alphas`` ``(n,)`` summing to 1.

    Iterates until a step moves the estimate by at most ``tol * (1 + ||z||)``
    (L2) or ``max_iter`` steps are done. Returns the estimate ``(d,)`` (float64)
    and the number of iterations done.
    """
    xd = x.double()
    a = alphas.double()
    z = a @ xd  # (d,)
    for it in range(1, max_iter + 1):
        dist = torch.linalg.vector_norm(xd - z, dim=1)  # (n,)
        b = a / dist.clamp_min(nu)
        z_new = (b @ xd) / b.sum()  # (d,)
        step = float(torch.linalg.vector_norm(z_new - z))
        z = z_new
        if step <= tol * (1.0 + float(torch.linalg.vector_norm(z))):
            return z, it
    return z, max_iter


def geometric_median(
    updates: Sequence[ClientUpdate], *, nu: float = 1e-6, max_iter: int = 1000, tol: float = 1e-10
) -> tuple[Params, float]:
    """Weighted geometric median of the deltas (RFA) and the total weight.

    ``tol`` and ``max_iter`` are the stopping rule of :func:`weiszfeld`.
    """
    if not nu > 0:
        raise ValueError(f"geometric_median nu must be > 0, got {nu}")
    if max_iter < 1:
        raise ValueError(f"geometric_median max_iter must be >= 1, got {max_iter}")
    if not tol > 0:
        raise ValueError(f"geometric_median tol must be > 0, got {tol}")
    check_round(updates, rule="geometric_median")
    total = total_weight(updates)
    alphas = torch.tensor([u.weight / total for u in updates], dtype=torch.float64)
    z, _ = weiszfeld(stack(updates), alphas, nu=nu, max_iter=max_iter, tol=tol)
    return unstack(z, updates[0].delta), total


def norm_bounded_mean(updates: Sequence[ClientUpdate], *, bound: float) -> tuple[Params, float]:
    """Clip each delta to L2 norm ``bound``, then the example-weighted mean (weights used)."""
    if not bound > 0:
        raise ValueError(f"norm_bounded_mean bound must be > 0, got {bound}")
    check_round(updates, rule="norm_bounded_mean")
    clipped = [replace(u, delta=_clip(u.delta, bound)) for u in updates]
    return weighted_mean(clipped)


def _clip(delta: Params, bound: float) -> Params:
    norm = delta.l2_norm()
    return delta if norm <= bound else delta * (bound / norm)
