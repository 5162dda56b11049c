"""Weighted FedAvg through a secure sum equals the plain weighted mean within the fixed-point bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedloom.algorithms.aggregate import weighted_mean
from fedloom.algorithms.api import ClientUpdate
from fedloom.core.errors import UpdateError
from fedloom.core.params import Params
from fedloom.secagg.simulate import simulate_secure_sum
from fedloom.secagg.updates import aggregate_from_sum, flatten_weighted


def _update(cid: int, weight: float, rng: np.random.Generator) -> ClientUpdate:
    delta = Params.from_numpy(
        {
            "w": rng.uniform(-1, 1, size=(3, 4)).astype(np.float32),
            "b": rng.uniform(-1, 1, size=4).astype(np.float32),
        }
    )
    return ClientUpdate(client_id=cid, delta=delta, weight=weight, num_examples=int(weight), num_steps=1)


def test_secure_weighted_mean_matches_plain_weighted_mean() -> None:
    rng = np.random.default_rng(0)
    updates = [_update(i, w, rng) for i, w in enumerate([10.0, 30.0, 5.0, 55.0, 20.0])]
    r = simulate_secure_sum([flatten_weighted(u, max_weight=100.0) for u in updates], clip=1.0, threshold=3)
    agg = aggregate_from_sum(r.total, updates[0].delta, max_weight=100.0, num_clients=len(r.included))
    expected, total_weight = weighted_mean(updates)
    assert agg.total_weight == pytest.approx(total_weight, rel=1e-6)
    assert agg.delta.allclose(expected, atol=1e-6)
    assert agg.delta["w"].dtype == torch.float32


def test_weights_outside_the_public_bound_are_rejected() -> None:
    u = _update(0, 150.0, np.random.default_rng(1))
    with pytest.raises(UpdateError, match="weight"):
        flatten_weighted(u, max_weight=100.0)
    with pytest.raises(UpdateError, match="shape"):
        aggregate_from_sum(np.ones(5), u.delta, max_weight=100.0, num_clients=1)
