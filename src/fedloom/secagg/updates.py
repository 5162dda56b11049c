"""Bridge between model updates and secure sums: weighted deltas in, an ``Aggregate`` out.

SecAgg can only *sum*. FedAvg's weighted mean ``sum_u w_u d_u / sum_u w_u``
becomes a sum by letting each client send ``[ (w_u / W) d_u , w_u / W ]`` --
its delta pre-scaled by its weight relative to a public bound ``W`` on weights,
with that relative weight as one extra coordinate -- and dividing the two parts
of the sum on the server. ``W`` keeps every coordinate inside the clip range:
with ``|d_u|_inf <= c`` (e.g. ``NormClip(max_norm=c)`` upstream) and
``w_u <= W``, every coordinate of the vector is in ``[-c, c]`` if ``c >= 1``.

Notes
-----
Threat model: the weights are summed under the masks too, so the server learns
only ``sum_u w_u``, not each client's example count. Per-update server checks
(``decode`` hooks such as ``NormClip``'s norm bound, robust aggregators such as
the median) cannot run under SecAgg -- the server never sees an individual
update -- so clipping must be trusted to the clients.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import NDArray

from fedloom.algorithms.api import Aggregate, ClientUpdate
from fedloom.core.errors import UpdateError
from fedloom.core.params import Params

__all__ = ["aggregate_from_sum", "flatten_weighted"]


def flatten_weighted(update: ClientUpdate, *, max_weight: float) -> NDArray[np.float64]:
    """``[(w / W) * delta (flattened, Params key order), w / W]`` as float64 (length: elements + 1).

    Raises :class:`UpdateError` unless ``0 < weight <= max_weight``.
    """
    w = update.weight
    if not 0 < w <= max_weight:
        raise UpdateError(
            f"client {update.client_id}: weight {w} must be in (0, {max_weight}] for secure sums"
        )
    scale = w / max_weight
    parts = [v.detach().to(torch.float64).reshape(-1).cpu().numpy() * scale for v in update.delta.values()]
    return np.concatenate([*parts, np.array([scale])])


def aggregate_from_sum(
    total: NDArray[np.float64], template: Params, *, max_weight: float, num_clients: int
) -> Aggregate:
    """Undo :func:`flatten_weighted` on a (secure) sum: the weighted-mean delta, shaped like ``template``.

    Raises :class:`UpdateError` if the length does not match ``template`` or the summed weight is not positive.
    """
    n = template.num_elements()
    if total.shape != (n + 1,):
        raise UpdateError(f"secure sum has shape {total.shape}, expected ({n + 1},) for this model")
    weight_sum = float(total[-1])
    if not weight_sum > 0:
        raise UpdateError(f"secure sum of weights is {weight_sum}; expected a positive total")
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for k, v in template.items():
        chunk = total[offset : offset + v.numel()] / weight_sum
        out[k] = torch.from_numpy(chunk.reshape(tuple(v.shape)).copy()).to(v.dtype)
        offset += v.numel()
    return Aggregate(delta=Params(out), num_clients=num_clients, total_weight=weight_sum * max_weight)
