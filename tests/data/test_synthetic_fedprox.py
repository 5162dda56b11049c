"""Synthetic(alpha, beta) of FedProx: determinism, laziness and the paper's structure."""

from __future__ import annotations

import numpy as np
import pytest

from fedloom.core.errors import DataError
from fedloom.data import FederatedDataset, SyntheticConfig, SyntheticDataset, synthetic_fedprox


def test_shapes_ranges_and_protocol() -> None:
    train = synthetic_fedprox(1.0, 1.0, seed=0)
    assert isinstance(train, FederatedDataset)
    assert train.num_clients == 30
    for cid in range(train.num_clients):
        d = train.client_data(cid)
        assert d.x.shape == (train.client_size(cid), 60)
        assert d.x.dtype.is_floating_point
        assert d.num_classes == 10
        assert int(d.y.min()) >= 0
        assert int(d.y.max()) < 10


def test_train_test_split_is_90_10_of_at_least_50() -> None:
    train = synthetic_fedprox(0.5, 0.5, seed=3, split="train")
    test = synthetic_fedprox(0.5, 0.5, seed=3, split="test")
    total = train.client_sizes() + test.client_sizes()
    assert np.all(total >= 50)
    assert np.array_equal(train.client_sizes(), np.floor(0.9 * total).astype(np.int64))


def test_deterministic_and_order_independent() -> None:
    a = synthetic_fedprox(1.0, 1.0, seed=5, num_clients=6)
    b = synthetic_fedprox(1.0, 1.0, seed=5, num_clients=6)
    late = [b.client_data(c) for c in (5, 2, 0)]
    for cid, d in zip((5, 2, 0), late, strict=True):
        first = a.client_data(cid)
        assert np.array_equal(first.x.numpy(), d.x.numpy())
        assert np.array_equal(first.y.numpy(), d.y.numpy())
    # A client's data does not depend on how many clients the federation has.
    bigger = synthetic_fedprox(1.0, 1.0, seed=5, num_clients=20)
    assert np.array_equal(bigger.client_data(2).x.numpy(), a.client_data(2).x.numpy())


def test_different_seed_differs() -> None:
    a = synthetic_fedprox(1.0, 1.0, seed=1, num_clients=3).client_data(0)
    b = synthetic_fedprox(1.0, 1.0, seed=2, num_clients=3).client_data(0)
    assert a.x.shape != b.x.shape or not np.array_equal(a.x.numpy(), b.x.numpy())


def test_sizes_follow_lognormal_4_2_plus_50() -> None:
    # n_k - 50 = floor(LogNormal(4, 2)): its median is floor(e^4) = 54 and P(log(n_k - 50 + 1) <= 6) ~ Phi(1).
    sizes = synthetic_fedprox(0.0, 0.0, seed=11, num_clients=4000)
    test = synthetic_fedprox(0.0, 0.0, seed=11, num_clients=4000, split="test")
    extra = sizes.client_sizes() + test.client_sizes() - 50
    assert np.all(extra >= 0)
    assert np.median(extra) == pytest.approx(54, abs=5)
    assert np.mean(np.log(extra + 1) <= 6.0) == pytest.approx(0.841, abs=0.03)


def test_max_client_size_caps() -> None:
    train = synthetic_fedprox(0.0, 0.0, seed=11, num_clients=200, max_client_size=100)
    test = synthetic_fedprox(0.0, 0.0, seed=11, num_clients=200, max_client_size=100, split="test")
    assert int((train.client_sizes() + test.client_sizes()).max()) == 100


def test_feature_covariance_is_diagonal_j_pow_minus_1_2() -> None:
    # Within a device x ~ N(v_k, Sigma), Sigma_jj = j^-1.2: pool residuals from the device means.
    fed = synthetic_fedprox(1.0, 1.0, seed=2, num_clients=40)
    residuals = []
    for cid in range(fed.num_clients):
        x = fed.client_data(cid).x.numpy().astype(np.float64)
        residuals.append(x - x.mean(axis=0))
    pooled = np.concatenate(residuals)  # (sum n_k, 60)
    j = np.arange(1, 61)
    ratio = pooled.var(axis=0) / j**-1.2
    assert np.all(np.abs(ratio - 1) < 0.1)
    corr = np.corrcoef(pooled[:, :5].T)
    assert np.abs(corr - np.eye(5)).max() < 0.06


def test_beta_controls_how_much_device_means_differ() -> None:
    # Device mean v_k ~ N(B_k, 1) with B_k ~ N(0, beta): across devices, mean(v_k) has variance beta^2;
    # in the IID variant every device has v_k = 0.
    def spread(fed: SyntheticDataset) -> float:
        means = [fed.client_data(c).x.numpy()[:, 0:60].mean() for c in range(fed.num_clients)]
        return float(np.var(means))

    assert spread(synthetic_fedprox(0.0, 0.0, seed=4, num_clients=60, iid=True)) < 0.05
    assert spread(synthetic_fedprox(0.0, 3.0, seed=4, num_clients=60)) > 2.0


def test_iid_variant_shares_one_labelling_model() -> None:
    # With shared W, b and identical input distributions, the label histograms of all devices
    # estimate one distribution; the non-IID ones do not.
    def label_spread(fed: SyntheticDataset) -> float:
        hists = [np.bincount(fed.client_data(c).y.numpy(), minlength=10) for c in range(fed.num_clients)]
        props = np.array([h / h.sum() for h in hists])
        big = fed.client_sizes() >= 200
        return float(props[big].std(axis=0).mean())

    iid = synthetic_fedprox(0.0, 0.0, seed=8, num_clients=80, iid=True)
    non = synthetic_fedprox(1.0, 1.0, seed=8, num_clients=80)
    assert label_spread(iid) < 0.5 * label_spread(non)


def test_invalid_arguments_are_all_listed() -> None:
    with pytest.raises(DataError) as info:
        SyntheticConfig(alpha=-1.0, beta=float("nan"), seed=0, num_clients=0, train_fraction=1.0)
    text = str(info.value)
    for word in ("alpha", "beta", "num_clients", "train_fraction"):
        assert word in text


def test_iid_requires_zero_alpha_beta() -> None:
    with pytest.raises(DataError, match="Synthetic-IID"):
        synthetic_fedprox(1.0, 0.0, seed=0, iid=True)


def test_bad_split_and_client_id() -> None:
    with pytest.raises(DataError, match="split"):
        synthetic_fedprox(0.0, 0.0, seed=0, split="valid")  # type: ignore[arg-type]
    with pytest.raises(DataError, match=r"valid ids are 0\.\.29"):
        synthetic_fedprox(0.0, 0.0, seed=0).client_data(30)
