"""Stack a round's deltas into one ``(n, d)`` matrix and back; pairwise distances.

Robust aggregators are coordinate-wise or distance-based statistics over the
``n`` client deltas seen as points in ``R^d``. This module is the only place
that flattens: every :class:`~fedloom.core.params.Params` is raveled in key
order and concatenated, and :func:`unstack` reshapes a ``(d,)`` vector back,
casting each tensor to the dtype it had.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedloom.algorithms.api import ClientUpdate
from fedloom.core.errors import UpdateError
from fedloom.core.params import Params

__all__ = ["check_round", "pairwise_sq_distances", "stack", "total_weight", "unstack"]

_BLOCK_ELEMENTS = 1 << 23


def check_round(updates: Sequence[ClientUpdate], *, min_clients: int = 1, rule: str = "aggregation") -> None:
    """Raise :class:`UpdateError` unless there are ``min_clients`` updates with matching structure."""
    if len(updates) < min_clients:
        raise UpdateError(f"{rule} needs at least {min_clients} client updates, got {len(updates)}")
    first = updates[0].delta
    for u in updates[1:]:
        first.check_compatible(u.delta, what=f"client {u.client_id} update")


def total_weight(updates: Sequence[ClientUpdate]) -> float:
    """``sum_i w_i``, reported as the aggregate's ``total_weight`` by every rule here."""
    total = float(sum(u.weight for u in updates))
    if not total > 0:
        raise UpdateError(f"total aggregation weight is {total}; every update must have a positive weight")
    return total


def stack(updates: Sequence[ClientUpdate]) -> torch.Tensor:
    """The deltas as rows of an ``(n, d)`` matrix in float32 (float64 if any tensor is float64)."""
    dtype = (
        torch.float64 if any(v.dtype == torch.float64 for v in updates[0].delta.values()) else torch.float32
    )
    rows = [torch.cat([v.reshape(-1).to(dtype) for v in u.delta.values()]) for u in updates]
    return torch.stack(rows)  # (n, d)


def unstack(vector: torch.Tensor, like: Params) -> Params:
    """Reshape a ``(d,)`` vector into tensors shaped (and typed) like ``like``."""
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for k, v in like.items():
        n = v.numel()
        out[k] = vector[offset : offset + n].reshape(v.shape).to(v.dtype)
        offset += n
    if offset != vector.numel():
        raise UpdateError(f"vector has {vector.numel()} elements, parameters need {offset}")
    return Params(out)


def pairwise_sq_distances(x: torch.Tensor) -> torch.Tensor:
    """``D[i, j] = ||x_i - x_j||^2`` as an ``(n, n)`` float64 matrix.

    Computed from the differences themselves (not a Gram matrix, whose
    cancellation would break exact ties between equidistant updates), summed in
    float64 over column chunks sized so that the ``(n, n, chunk)`` block stays
    around 64 MiB.
    """
    n, d = x.shape
    chunk = max(1, _BLOCK_ELEMENTS // max(n * n, 1))
    dist = torch.zeros(n, n, dtype=torch.float64)
    for start in range(0, d, chunk):
        block = x[:, start : start + chunk].double()  # (n, c)
        diff = block[:, None, :] - block[None, :, :]  # (n, n, c)
        dist += (diff * diff).sum(dim=2)
    return dist
