"""Partitioners: exact cover, scheme-specific structure, determinism and argument checks."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.core.errors import DataError
from fedloom.data import available_schemes, dirichlet, iid, partition, quantity_skew, register_scheme, shards


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    """Every index in range(n) appears in exactly one part; parts are sorted int64."""
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0), "each part must be strictly ascending"
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(n))


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def balanced_labels(num_classes: int, per_class: int) -> np.ndarray:
    return np.repeat(np.arange(num_classes), per_class)


# --- iid ---------------------------------------------------------------------------------------


def test_iid_exact_cover_and_near_equal_sizes() -> None:
    parts = iid(1003, 10, rng())
    assert_exact_cover(parts, 1003)
    assert sorted(len(p) for p in parts) == [100] * 7 + [101] * 3


def test_iid_needs_one_example_per_client() -> None:
    with pytest.raises(DataError, match="num_examples=3 is smaller than num_clients=4"):
        iid(3, 4, rng())


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 500), k=st.integers(1, 50), seed=st.integers(0, 2**32))
def test_iid_property(n: int, k: int, seed: int) -> None:
    if n < k:
        return
    assert_exact_cover(iid(n, k, rng(seed)), n)


# --- dirichlet ---------------------------------------------------------------------------------


def test_dirichlet_exact_cover_on_mnist(mnist_train_labels: np.ndarray) -> None:
    parts = dirichlet(mnist_train_labels, 100, 0.5, rng(), min_size=10)
    assert_exact_cover(parts, 60000)
    assert min(len(p) for p in parts) >= 10


@settings(max_examples=25, deadline=None)
@given(
    labels=st.lists(st.integers(0, 4), min_size=20, max_size=300),
    k=st.integers(1, 10),
    alpha=st.floats(0.05, 50),
    seed=st.integers(0, 2**32),
)
def test_dirichlet_property(labels: list[int], k: int, alpha: float, seed: int) -> None:
    y = np.array(labels)
    assert_exact_cover(dirichlet(y, k, alpha, rng(seed), min_size=0), y.size)


@pytest.mark.parametrize("alpha", [0.1, 1.0, 100.0])
def test_dirichlet_share_variance_matches_closed_form(alpha: float) -> None:
    # For each class, the vector of shares over K clients is ~ Dir(alpha 1_K), whose marginals
    # have variance (1/K)(1 - 1/K) / (K alpha + 1). 20 classes x 1000 examples each keeps the
    # flooring error negligible; the tolerance covers sampling noise of 200 correlated entries.
    k, c = 10, 20
    labels = balanced_labels(c, 1000)
    hist = np.stack(
        [
            np.bincount(labels[p], minlength=c)
            for p in partition(labels, "dirichlet", k, 7, alpha=alpha, min_size=0)
        ]
    )
    shares = hist / 1000.0  # (clients, classes), columns sum to 1
    expected = (1 / k) * (1 - 1 / k) / (k * alpha + 1)
    assert shares.var() == pytest.approx(expected, rel=0.35)


def test_dirichlet_small_alpha_is_skewed_large_alpha_is_near_global() -> None:
    labels = balanced_labels(10, 2000)

    def label_dists(alpha: float) -> np.ndarray:
        parts = partition(labels, "dirichlet", 10, 3, alpha=alpha)
        hist = np.stack([np.bincount(labels[p], minlength=10) for p in parts])
        dists: np.ndarray = hist / hist.sum(axis=1, keepdims=True)
        return dists

    skewed, near = label_dists(0.1), label_dists(100.0)
    # alpha = 0.1: a client's most common label dominates; uniform would give 0.1.
    assert skewed.max(axis=1).mean() > 0.5
    # alpha = 100: every client's label distribution is within a few points of the global 0.1.
    assert np.abs(near - 0.1).max() < 0.05


def test_dirichlet_min_size_unreachable_raises() -> None:
    labels = np.zeros(20, dtype=np.int64)  # one class: a 10/10 split is (nearly) never drawn
    with pytest.raises(DataError, match="min_size=10"):
        dirichlet(labels, 2, 0.01, rng(), min_size=10, max_attempts=5)


def test_dirichlet_too_few_examples_for_min_size() -> None:
    with pytest.raises(DataError, match="cannot give 5 clients"):
        dirichlet(balanced_labels(2, 2), 5, 1.0, rng())


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_dirichlet_rejects_bad_alpha(alpha: float) -> None:
    with pytest.raises(DataError, match="alpha"):
        dirichlet(balanced_labels(2, 5), 2, alpha, rng())


# --- shards ------------------------------------------------------------------------------------


def test_shards_mcmahan_structure_on_mnist(mnist_train_labels: np.ndarray) -> None:
    y = mnist_train_labels
    parts = shards(y, 100, rng())
    assert_exact_cover(parts, 60000)  # 200 shards x 300 = 60000
    assert all(len(p) == 600 for p in parts)

    # Each client holds exactly two runs of 300 consecutive positions of the stable label sort,
    # each run starting at a multiple of 300.
    rank = np.empty(y.size, dtype=np.int64)
    rank[np.argsort(y, kind="stable")] = np.arange(y.size)
    for p in parts:
        pos = np.sort(rank[p])
        runs = pos.reshape(2, 300)
        assert np.all(runs[:, 0] % 300 == 0)
        assert np.all(np.diff(runs, axis=1) == 1)

    # A shard holds one label, or two where it straddles a class boundary. MNIST's class counts
    # are not multiples of 300, so 9 shards straddle; only clients holding one of those can
    # have more than two labels.
    boundaries = np.cumsum(np.bincount(y))[:-1]
    straddling = int(np.sum(boundaries % 300 != 0))
    labels_per_client = np.array([np.unique(y[p]).size for p in parts])
    assert labels_per_client.max() <= 4
    assert np.sum(labels_per_client > 2) <= straddling
    assert np.sum(labels_per_client <= 2) >= 100 - straddling


def test_shards_each_shard_has_at_most_two_labels_and_one_when_aligned() -> None:
    labels = balanced_labels(10, 100)  # class boundaries at multiples of 100 = shard size
    parts = shards(labels, 5, rng(), shards_per_client=2)
    for p in parts:
        assert np.unique(labels[p]).size <= 2


def test_shards_leftovers_are_the_last_in_label_order() -> None:
    labels = np.array([3, 0, 2, 1, 0, 2, 1, 3, 0, 1, 2])  # 11 examples, 2 clients x 2 shards of 2
    parts = shards(labels, 2, rng())
    assigned = np.sort(np.concatenate(parts))
    assert assigned.size == 8
    order = np.argsort(labels, kind="stable")
    assert np.array_equal(assigned, np.sort(order[:8]))


def test_shards_more_than_examples_raise() -> None:
    with pytest.raises(DataError, match="only 10"):
        shards(np.zeros(10, dtype=np.int64), 6, rng())  # 12 shards > 10 examples
    with pytest.raises(DataError, match="only 10"):
        shards(np.zeros(10, dtype=np.int64), 2, rng(), shard_size=3)  # 4 x 3 = 12 > 10


def test_shards_custom_size() -> None:
    parts = shards(balanced_labels(4, 25), 5, rng(), shards_per_client=3, shard_size=4)
    assert [len(p) for p in parts] == [12] * 5


# --- quantity skew -----------------------------------------------------------------------------


def test_quantity_skew_exact_cover_and_skewed_sizes() -> None:
    parts = quantity_skew(10000, 50, rng(), sigma=1.0, min_size=20)
    assert_exact_cover(parts, 10000)
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 20
    assert sizes.max() > 3 * np.median(sizes)  # a lognormal(0, 1) tail


def test_quantity_skew_sigma_zero_is_balanced() -> None:
    sizes = [len(p) for p in quantity_skew(1003, 10, rng(), sigma=0.0)]
    assert max(sizes) - min(sizes) <= 1


@settings(max_examples=30, deadline=None)
@given(n=st.integers(10, 500), k=st.integers(1, 10), sigma=st.floats(0, 3), seed=st.integers(0, 2**32))
def test_quantity_skew_property(n: int, k: int, sigma: float, seed: int) -> None:
    parts = quantity_skew(n, k, rng(seed), sigma=sigma, min_size=1)
    assert_exact_cover(parts, n)
    assert min(len(p) for p in parts) >= 1


def test_quantity_skew_too_few_examples() -> None:
    with pytest.raises(DataError, match="min_size=5"):
        quantity_skew(10, 3, rng(), min_size=5)


# --- dispatcher and determinism ----------------------------------------------------------------

SCHEMES: list[tuple[str, dict[str, Any]]] = [
    ("iid", {}),
    ("dirichlet", {"alpha": 0.5}),
    ("shards", {}),
    ("quantity_skew", {"sigma": 1.0}),
]


@pytest.mark.parametrize(("scheme", "options"), SCHEMES)
def test_same_seed_same_partition_different_seed_different(scheme: str, options: dict[str, Any]) -> None:
    labels = balanced_labels(10, 100)
    a = partition(labels, scheme, 10, seed=1, **options)
    b = partition(labels, scheme, 10, seed=1, **options)
    c = partition(labels, scheme, 10, seed=2, **options)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_registry_lists_builtin_schemes() -> None:
    assert {"iid", "dirichlet", "shards", "quantity_skew"} <= set(available_schemes())


def test_unknown_scheme_lists_available() -> None:
    with pytest.raises(DataError, match=r"unknown partition scheme 'bogus'.*dirichlet"):
        partition(np.zeros(4, dtype=np.int64), "bogus", 2, 0)


def test_unknown_and_missing_options() -> None:
    with pytest.raises(DataError, match=r"unknown option\(s\) \['beta'\]"):
        partition(np.zeros(4, dtype=np.int64), "iid", 2, 0, beta=1)
    with pytest.raises(DataError, match=r"missing option\(s\) \['alpha'\]"):
        partition(np.zeros(4, dtype=np.int64), "dirichlet", 2, 0)


def test_duplicate_registration_is_refused() -> None:
    with pytest.raises(DataError, match="already registered"):
        register_scheme("iid", lambda labels, k, rng: [])


@pytest.mark.parametrize("k", [0, -1])
def test_num_clients_validated(k: int) -> None:
    with pytest.raises(DataError, match="num_clients"):
        partition(np.zeros(4, dtype=np.int64), "iid", k, 0)


def test_labels_validated() -> None:
    with pytest.raises(DataError, match="1-D integer"):
        partition(np.zeros((2, 2), dtype=np.int64), "iid", 2, 0)
    with pytest.raises(DataError, match=">= 0"):
        partition(np.array([0, -3]), "dirichlet", 2, 0, alpha=1.0)
