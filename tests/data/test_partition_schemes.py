"""The label-skew, size and natural partitioners: exact cover and each scheme's defining property.

Statistical checks compare against closed-form moments with tolerances derived from
the variance of the statistic (4 standard deviations), never against a previous run.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedloom.core.errors import DataError, TaskError
from fedloom.data import ArrayDataset, client_sizes, inner_dirichlet, natural, partition, pathological, sized


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(n))


# --- dirichlet: each class's shares over clients ~ Dir(alpha 1_K) ------------------------------


@pytest.mark.parametrize("alpha", [0.1, 1.0, 10.0])
def test_dirichlet_shares_match_the_dirichlet_moments(alpha: float) -> None:
    # 200 classes of 2000 examples, 10 clients. A share p = count / 2000 is Beta(alpha, 9 alpha):
    # E[p] = 1/K and Var[p] = (1/K)(1 - 1/K) / (K alpha + 1); classes are independent draws.
    k, c, n = 10, 200, 2000
    labels = np.repeat(np.arange(c), n)
    parts = partition(labels, "dirichlet", k, 5, alpha=alpha, min_size=0)
    shares = np.stack([np.bincount(labels[p], minlength=c) for p in parts]) / n  # (clients, classes)
    var = (1 / k) * (1 - 1 / k) / (k * alpha + 1)
    # Every client's mean share over the classes is the Dirichlet mean 1/K.
    assert np.all(np.abs(shares.mean(axis=1) - 1 / k) < 4 * np.sqrt(var / c))
    # Per class, S = sum_k p_k^2 has mean K (Var[p] + 1/K^2), which moves with alpha
    # (alpha x 1.5 or / 1.5 shifts it by more than 4 standard errors here).
    s = (shares**2).sum(axis=0)
    assert abs(s.mean() - k * (var + 1 / k**2)) < 4 * s.std() / np.sqrt(c)


# --- pathological: exactly k classes per client --------------------------------------------------


@pytest.mark.parametrize(("num_classes", "k", "clients"), [(7, 2, 20), (13, 3, 9), (5, 5, 4), (62, 1, 62)])
def test_pathological_gives_every_client_exactly_k_classes(num_classes: int, k: int, clients: int) -> None:
    gen = np.random.default_rng(num_classes)
    labels = gen.permutation(np.repeat(np.arange(num_classes), 40))  # the class count comes from the data
    parts = partition(labels, "pathological", clients, 3, classes_per_client=k)
    assert len(parts) == clients
    assert_exact_cover(parts, labels.size)
    assert [np.unique(labels[p]).size for p in parts] == [k] * clients


def test_pathological_balances_holders_and_varies_combinations() -> None:
    labels = np.repeat(np.arange(10), 300)
    parts = pathological(labels, 100, np.random.default_rng(0), classes_per_client=2)
    held = [frozenset(np.unique(labels[p]).tolist()) for p in parts]
    # 100 clients x 2 slots over 10 classes: every class has exactly 20 holders ...
    holders = [sum(c in h for h in held) for c in range(10)]
    assert holders == [20] * 10
    # ... and splits its 300 examples among them in parts of 15.
    for c in range(10):
        assert [int(np.sum(labels[p] == c)) for p, h in zip(parts, held, strict=True) if c in h] == [15] * 20
    # Class pairs are drawn, not fixed: far more than the 5 pairs a fixed pairing would give.
    assert len(set(held)) > 15


def test_pathological_holder_counts_differ_by_at_most_one() -> None:
    labels = np.repeat(np.arange(7), 50)
    parts = pathological(labels, 9, np.random.default_rng(4), classes_per_client=3)  # 27 slots, 7 classes
    counts = [sum(np.any(labels[p] == c) for p in parts) for c in range(7)]
    assert sorted(counts) == [3, 4, 4, 4, 4, 4, 4]  # 27 = 6 x 4 + 3


def test_pathological_refuses_impossible_requests() -> None:
    labels = np.repeat(np.arange(3), 2)
    with pytest.raises(DataError, match="only 3 classes"):
        pathological(labels, 2, np.random.default_rng(0), classes_per_client=4)
    with pytest.raises(DataError, match="cannot cover all 3 classes"):
        pathological(labels, 1, np.random.default_rng(0), classes_per_client=2)
    with pytest.raises(DataError, match="has 2 examples but 3 clients hold it"):
        pathological(labels, 3, np.random.default_rng(0), classes_per_client=3)


# --- inner Dirichlet: fixed sizes, label mix ~ Dir(alpha * prior) ----------------------------------


def test_inner_dirichlet_keeps_the_given_sizes_and_covers_everything() -> None:
    labels = np.random.default_rng(1).integers(0, 6, 1000)
    sizes = np.array([100, 300, 50, 550])
    parts = inner_dirichlet(labels, 4, np.random.default_rng(2), alpha=0.3, sizes=sizes)
    assert [len(p) for p in parts] == sizes.tolist()
    assert_exact_cover(parts, 1000)
    with pytest.raises(DataError, match="summing to 1000"):
        inner_dirichlet(labels, 4, np.random.default_rng(2), alpha=0.3, sizes=np.array([1, 2, 3, 4]))


@pytest.mark.parametrize("alpha", [0.5, 5.0])
def test_inner_dirichlet_label_mix_matches_the_dirichlet_moments(alpha: float) -> None:
    # Class counts 400, 800, ..., 2000 (twice): prior pi_c = count / 12000. 600 clients of 20; the
    # first 20 clients take at most 400 examples, so no class runs out before them and their label
    # counts are Multinomial(20, q) with q ~ Dir(alpha pi). Then x_c = count_c / 20 has
    #   E[x_c] = pi_c,  Var[x_c] = pi_c (1 - pi_c) / (alpha + 1) * (1 + alpha / 20).
    counts = np.array([400, 800, 1200, 1600, 2000] * 2)
    labels = np.repeat(np.arange(10), counts)
    pi, n = counts / counts.sum(), 20
    rows = []
    for seed in range(40):
        parts = partition(labels, "inner_dirichlet", 600, seed, alpha=alpha)
        assert [len(p) for p in parts] == [n] * 600
        rows += [np.bincount(labels[p], minlength=10) / n for p in parts[:20]]
    x = np.array(rows)  # (800 independent clients, 10 classes)
    m = x.shape[0]
    var = pi * (1 - pi) / (alpha + 1) * (1 + alpha / n)
    # The mean proportion of each class is the Dirichlet mean.
    assert np.all(np.abs(x.mean(axis=0) - pi) < 4 * np.sqrt(var / m))
    # Per client, D = sum_c (x_c - pi_c)^2 has mean sum_c Var[x_c], which depends on alpha
    # (alpha x 1.5 or / 1.5 moves the mean of D by more than 7 standard errors here).
    d = ((x - pi) ** 2).sum(axis=1)
    assert abs(d.mean() - var.sum()) < 4 * d.std() / np.sqrt(m)


def test_inner_dirichlet_small_alpha_concentrates_labels() -> None:
    labels = np.repeat(np.arange(10), 1000)
    skewed = partition(labels, "inner_dirichlet", 50, 0, alpha=0.05)
    spread = partition(labels, "inner_dirichlet", 50, 0, alpha=1000.0)

    def top_share(parts: list[np.ndarray]) -> float:
        return float(np.mean([np.bincount(labels[p]).max() / len(p) for p in parts[:10]]))

    assert top_share(skewed) > 0.6
    assert top_share(spread) < 0.25


# --- size distributions ----------------------------------------------------------------------


def test_linear_and_square_sizes_are_exact() -> None:
    gen = np.random.default_rng(0)
    assert client_sizes(550, 10, gen, distribution="linear", min_size=0).tolist() == list(range(10, 101, 10))
    assert client_sizes(770, 10, gen, distribution="square", min_size=0).tolist() == [
        2 * (k + 1) ** 2 for k in range(10)
    ]
    # min_size first, then the remaining 550 in proportion k + 1.
    assert client_sizes(600, 10, gen, distribution="linear", min_size=5).tolist() == [
        5 + 10 * (k + 1) for k in range(10)
    ]


def test_exponential_sizes_grow_geometrically() -> None:
    rate = float(np.log(2.0))
    sizes = client_sizes(
        255 * 4, 8, np.random.default_rng(0), distribution="exponential", rate=rate, min_size=0
    )
    assert int(sizes.sum()) == 1020
    assert np.all(np.abs(sizes - 4 * 2 ** np.arange(8)) <= 1)  # floored cumulative cuts: off by at most one


@pytest.mark.parametrize("scheme", ["linear", "square", "exponential"])
def test_size_schemes_cover_every_example_once(scheme: str) -> None:
    labels = np.zeros(1234, dtype=np.int64)
    parts = partition(labels, scheme, 17, 5, min_size=3)
    assert_exact_cover(parts, 1234)
    sizes = [len(p) for p in parts]
    assert min(sizes) >= 3
    assert sizes == sorted(sizes)  # ascending in the client id
    again = partition(labels, scheme, 17, 5, min_size=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_sized_rejects_unknown_distribution() -> None:
    with pytest.raises(DataError, match="unknown distribution 'cubic'"):
        sized(10, 2, np.random.default_rng(0), distribution="cubic")


# --- natural: one client per id ----------------------------------------------------------------


def test_natural_makes_one_client_per_id() -> None:
    groups = np.array(["b", "a", "c", "a", "b", "a"])
    parts, names = natural(groups)
    assert names == ["a", "b", "c"]
    assert [p.tolist() for p in parts] == [[1, 3, 5], [0, 4], [2]]
    labels = np.zeros(6, dtype=np.int64)
    assert [p.tolist() for p in partition(labels, "natural", 3, 0, groups=groups)] == [[1, 3, 5], [0, 4], [2]]
    with pytest.raises(DataError, match="num_clients must be 3"):
        partition(labels, "natural", 4, 0, groups=groups)


# --- the experiment file's [data] keys -------------------------------------------------------


def test_config_keys_map_to_scheme_options() -> None:
    from fedloom.config import load_config
    from fedloom.sim.build import split_for

    def spec(*sets: str) -> tuple[str, dict[str, object]]:
        s = split_for(load_config(None, list(sets)))
        return s.scheme, dict(s.options)

    assert spec("data.partition='pathological'", "data.classes_per_client=3") == (
        "pathological",
        {"classes_per_client": 3},
    )
    assert spec("data.partition='exponential'", "data.size_rate=0.5", "data.min_client_size=4") == (
        "exponential",
        {"min_size": 4, "rate": 0.5},
    )
    assert spec("data.partition='inner_dirichlet'", "data.alpha=0.2", "data.inner_sizes='square'") == (
        "inner_dirichlet",
        {"alpha": 0.2, "size_distribution": "square", "min_size": 1, "sigma": 1.0, "rate": 0.1},
    )


def test_natural_partition_of_a_task_with_an_id_column() -> None:
    import torch
    from torch import nn

    from fedloom.tasks import CentralData, PartitionSpec, Task, materialise

    y = torch.tensor([0, 1, 0, 1, 1, 0])
    writers = ["w2", "w1", "w2", "w3", "w1", "w1"]
    task = Task(
        model=lambda: nn.Linear(2, 2),
        data=CentralData(train=ArrayDataset(torch.zeros(6, 2), y), groups=writers),
    )
    m = materialise(task, seed=0, split=PartitionSpec(scheme="natural", num_clients=3, seed=0))
    assert [m.train.client_data(c).y.tolist() for c in range(3)] == [[1, 1, 0], [0, 0], [1]]  # w1, w2, w3
    assert m.client_names == ("w1", "w2", "w3")
    no_groups = Task(
        model=lambda: nn.Linear(2, 2), data=CentralData(train=ArrayDataset(torch.zeros(6, 2), y))
    )
    with pytest.raises(TaskError, match=r"needs an id column"):
        materialise(no_groups, seed=0, split=PartitionSpec(scheme="natural", num_clients=3, seed=0))
