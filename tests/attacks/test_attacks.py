"""Attacks produce their documented transformations, only on malicious clients."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch

from fedloom.algorithms.api import ClientUpdate, ServerContext
from fedloom.attacks import (
    ALIE,
    GaussianAttack,
    LabelFlippedDataset,
    Scaling,
    SignFlip,
    alie_z,
    flip_labels,
    malicious_clients,
)
from fedloom.core.params import Params
from fedloom.data.datasets import ArrayDataset
from fedloom.data.federated import PartitionedDataset

CTX = ServerContext(seed=1, round=2, population=10)


def _u(cid: int, values: list[float] | torch.Tensor) -> ClientUpdate:
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values)
    return ClientUpdate(client_id=cid, delta=Params({"w": t}), weight=1.0, num_examples=1, num_steps=1)


def test_malicious_set_is_a_fixed_fraction_drawn_once() -> None:
    bad = malicious_clients(3, 100, 0.2)
    assert len(bad) == 20
    assert bad == malicious_clients(3, 100, 0.2)
    assert bad != malicious_clients(4, 100, 0.2)
    assert all(0 <= c < 100 for c in bad)
    assert malicious_clients(3, 100, 0.0) == frozenset()
    with pytest.raises(ValueError, match="fraction"):
        malicious_clients(3, 100, 1.5)


def test_sign_flip_and_scaling_touch_only_malicious_clients() -> None:
    bad = frozenset({1})
    honest, evil = _u(0, [1.0, -2.0]), _u(1, [1.0, -2.0])
    flip = SignFlip(bad, scale=3.0)
    assert flip.client(honest, CTX) is honest
    assert flip.client(evil, CTX).delta["w"].tolist() == [-3.0, 6.0]
    boost = Scaling(bad, boost=10.0)
    assert boost.client(evil, CTX).delta["w"].tolist() == [10.0, -20.0]
    assert boost.decode(evil, CTX) is evil


def test_gaussian_attack_replaces_the_update_with_noise_of_the_given_std() -> None:
    d = 20_000
    attack = GaussianAttack(frozenset({1}), std=3.0)
    out = attack.client(_u(1, torch.ones(d)), CTX).delta["w"].double()
    assert float(out.std()) == pytest.approx(3.0, rel=5 / math.sqrt(2 * d))
    assert abs(float(out.mean())) < 5 * 3.0 / math.sqrt(d)
    assert torch.equal(out, attack.client(_u(1, torch.ones(d)), CTX).delta["w"].double())


def test_alie_z_follows_the_paper() -> None:
    # n = 50, f = 10: s = floor(26) - 10 = 16, z = Phi^-1(34 / 50).
    assert alie_z(50, 10) == pytest.approx(statistics.NormalDist().inv_cdf(34 / 50))
    assert math.isfinite(alie_z(10, 9))


def test_alie_replaces_malicious_updates_by_mean_minus_z_std() -> None:
    benign = [_u(0, [1.0, 10.0]), _u(2, [3.0, 10.0]), _u(3, [5.0, 10.0])]
    evil = _u(1, [100.0, 100.0])
    failure = "client 4 failed"
    out = ALIE(frozenset({1}), z=1.5).apply([benign[0], evil, benign[1], benign[2], failure], CTX)
    assert out[4] == failure
    assert out[0] is benign[0]
    crafted = out[1]
    assert isinstance(crafted, ClientUpdate)
    # mean (3, 10), sample std (2, 0).
    assert crafted.delta["w"].tolist() == [3.0 - 1.5 * 2.0, 10.0]
    default = ALIE(frozenset({1})).apply([*benign, evil], CTX)[3]
    assert isinstance(default, ClientUpdate)
    z = alie_z(4, 1)
    assert default.delta["w"][0].item() == pytest.approx(3.0 - z * 2.0)


def test_label_flipping_maps_y_to_c_minus_one_minus_y_on_malicious_clients() -> None:
    data = ArrayDataset(torch.zeros(6, 2), torch.tensor([0, 1, 2, 7, 8, 9]), 10)
    assert flip_labels(data).y.tolist() == [9, 8, 7, 2, 1, 0]
    fed = PartitionedDataset(data, [np.arange(3), np.arange(3, 6)])
    poisoned = LabelFlippedDataset(fed, frozenset({1}))
    assert poisoned.client_data(0).y.tolist() == [0, 1, 2]
    assert poisoned.client_data(1).y.tolist() == [2, 1, 0]
    assert poisoned.num_clients == 2
    assert poisoned.client_sizes().tolist() == [3, 3]
