"""Robust aggregators: golden values on hand-made inputs, and breakdown behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedloom.aggregators import (
    AGGREGATORS,
    bulyan,
    coordinate_median,
    geometric_median,
    krum,
    make_aggregator,
    multi_krum,
    norm_bounded_mean,
    register,
    trimmed_mean,
)
from fedloom.aggregators.stacking import pairwise_sq_distances
from fedloom.algorithms.api import ClientUpdate
from fedloom.core.errors import ConfigError, UpdateError
from fedloom.core.params import Params


def _u(cid: int, values: list[float] | torch.Tensor, weight: float = 1.0) -> ClientUpdate:
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.float32)
    return ClientUpdate(client_id=cid, delta=Params({"w": t}), weight=weight, num_examples=1, num_steps=1)


def _scalars(values: list[float], weights: list[float] | None = None) -> list[ClientUpdate]:
    ws = weights or [1.0] * len(values)
    return [_u(i, [v], w) for i, (v, w) in enumerate(zip(values, ws, strict=True))]


def _w(result: tuple[Params, float]) -> torch.Tensor:
    return result[0]["w"]


def test_median_odd_even_and_weights_ignored() -> None:
    assert _w(coordinate_median(_scalars([3.0, 1.0, 2.0], [1, 100, 1]))).tolist() == [2.0]
    assert _w(coordinate_median(_scalars([1.0, 2.0, 3.0, 10.0]))).tolist() == [2.5]
    two_d = [_u(0, [1.0, 9.0]), _u(1, [5.0, 0.0]), _u(2, [3.0, 4.0])]
    delta, total = coordinate_median(two_d)
    assert delta["w"].tolist() == [3.0, 4.0]
    assert total == 3.0


def test_trimmed_mean_drops_beta_fraction_each_end() -> None:
    assert _w(trimmed_mean(_scalars([1.0, 2.0, 3.0, 4.0, 100.0]), beta=0.2)).tolist() == [3.0]
    assert _w(trimmed_mean(_scalars([1.0, 2.0, 3.0, 4.0, 100.0]), beta=0.0)).tolist() == [22.0]
    with pytest.raises(ValueError, match="beta"):
        trimmed_mean(_scalars([1.0]), beta=0.5)


def test_krum_and_multi_krum_golden() -> None:
    pts = _scalars([0.0, 1.0, 2.0, 3.0, 100.0])
    # f=1, k=2 neighbours: scores 5, 2, 2, 5, huge -> tie between positions 1 and 2 goes to 1.
    assert _w(krum(pts, f=1)).tolist() == [1.0]
    assert _w(multi_krum(pts, f=1, m=2)).tolist() == [1.5]
    with pytest.raises(UpdateError, match="at least 5"):
        krum(pts[:4], f=1)


def test_bulyan_golden() -> None:
    # By hand: n=7, f=1, theta=5, beta=3. Repeated Krum selects the values 2, 3, 1, 4, 0 (ties to the
    # lower position); the beta = 3 selected values closest to their median 2 are {2, 1, 3}: mean 2.
    assert _w(bulyan(_scalars([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 1000.0]), f=1)).tolist() == [2.0]
    with pytest.raises(UpdateError, match="at least 7"):
        bulyan(_scalars([0.0] * 6), f=1)


def test_geometric_median_golden() -> None:
    square = [_u(0, [0.0, 0.0]), _u(1, [1.0, 0.0]), _u(2, [0.0, 1.0]), _u(3, [1.0, 1.0])]
    assert torch.allclose(_w(geometric_median(square)), torch.tensor([0.5, 0.5]), atol=1e-5)
    line = _scalars([0.0, 1.0, 2.0, 3.0, 1000.0])
    assert _w(geometric_median(line, max_iter=500)).item() == pytest.approx(2.0, abs=1e-2)
    # Weights count: a heavy point pulls the median onto itself.
    heavy = _scalars([0.0, 10.0], [1.0, 3.0])
    assert _w(geometric_median(heavy, max_iter=500)).item() == pytest.approx(10.0, abs=1e-3)


def test_norm_bounded_mean_clips_then_weights() -> None:
    ups = [_u(0, [3.0, 4.0], weight=1.0), _u(1, [0.0, 0.5], weight=3.0)]
    delta, total = norm_bounded_mean(ups, bound=1.0)
    assert torch.allclose(delta["w"], torch.tensor([(0.6 + 0.0) / 4, (0.8 + 1.5) / 4]))
    assert total == 4.0


def test_pairwise_distances_exact() -> None:
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    d = pairwise_sq_distances(x)
    assert torch.allclose(d, torch.tensor([[0.0, 25.0, 2.0], [25.0, 0.0, 13.0], [2.0, 13.0, 0.0]]).double())


def _benign_and_attack(seed: int, n: int, f: int, d: int = 20) -> tuple[list[ClientUpdate], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    benign = torch.randn(n - f, d, generator=g) * 0.1 + 1.0
    attack = (torch.rand(f, d, generator=g) - 0.5) * 2e6  # arbitrary and huge, both signs
    rows = torch.cat([attack, benign])  # attackers first: ties cannot favour them
    return [_u(i, rows[i].clone()) for i in range(n)], benign


@pytest.mark.parametrize("seed", range(5))
def test_median_breakdown_with_half_minus_one_attackers(seed: int) -> None:
    ups, benign = _benign_and_attack(seed, n=11, f=5)
    out = _w(coordinate_median(ups))
    assert bool((out >= benign.min(0).values).all() and (out <= benign.max(0).values).all())


@pytest.mark.parametrize("seed", range(5))
def test_trimmed_mean_ignores_beta_fraction_outliers(seed: int) -> None:
    ups, benign = _benign_and_attack(seed, n=10, f=2)
    out = _w(trimmed_mean(ups, beta=0.2))
    assert bool((out >= benign.min(0).values).all() and (out <= benign.max(0).values).all())


@pytest.mark.parametrize("seed", range(5))
def test_krum_and_bulyan_pick_benign_with_f_attackers(seed: int) -> None:
    ups, benign = _benign_and_attack(seed, n=11, f=4)
    chosen = _w(krum(ups, f=4))
    assert any(torch.equal(chosen, b) for b in benign)
    ups_b, benign_b = _benign_and_attack(seed, n=11, f=2)
    out = _w(bulyan(ups_b, f=2))
    assert bool((out >= benign_b.min(0).values).all() and (out <= benign_b.max(0).values).all())
    geo = _w(geometric_median(ups, max_iter=200))
    assert float((geo - benign.mean(0)).norm()) < 1.0


@pytest.mark.parametrize("seed", range(5))
def test_multi_krum_averages_only_benign_updates_with_f_attackers(seed: int) -> None:
    n, f, m = 11, 4, 5
    ups, benign = _benign_and_attack(seed, n=n, f=f)
    out = _w(multi_krum(ups, f=f, m=m))
    # The m selected are benign rows, so their mean lies in the benign hull and is an exact
    # mean of m of them: check it against every benign row set it could be, via the scores.
    assert bool((out >= benign.min(0).values).all() and (out <= benign.max(0).values).all())
    dist = pairwise_sq_distances(benign.double())
    k = n - f - 2  # Krum's neighbourhood size
    scores = dist.sort(dim=1).values[:, 1 : k + 1].sum(1)  # all-benign scores order the benign rows alike
    assert torch.allclose(out, benign[scores.argsort()[:m]].mean(0), atol=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_norm_bound_caps_the_influence_of_any_update(seed: int) -> None:
    n, f, bound = 10, 3, 10.0  # benign norms are about sqrt(20) < bound: only attackers are clipped
    ups, benign = _benign_and_attack(seed, n=n, f=f)
    out = _w(norm_bounded_mean(ups, bound=bound))
    clean = benign.mean(0)
    # Each attacker moves the mean by at most bound / n, whatever it sent (2e6-sized here).
    shift = float((out - clean * (n - f) / n).norm())
    assert shift <= f * bound / n + 1e-5
    # The plain mean is destroyed by the same attackers.
    plain = torch.stack([u.delta["w"] for u in ups]).mean(0)
    assert float((plain - clean).norm()) > 1e4


def test_registry_refuses_duplicates_and_bad_names_or_options() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register("median", lambda **_: coordinate_median)
    with pytest.raises(ConfigError, match="unknown"):
        make_aggregator("average")
    with pytest.raises(ConfigError, match="trimmed_mean"):
        make_aggregator("trimmed_mean", bta=0.1)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("mean", {}),
        ("median", {}),
        ("trimmed_mean", {"beta": 0.1}),
        ("krum", {"f": 1}),
        ("multi_krum", {"f": 1, "m": 3}),
        ("bulyan", {"f": 1}),
        ("geometric_median", {}),
        ("norm_bound", {"bound": 10.0}),
    ],
)
def test_every_registered_rule_has_the_weighted_mean_signature(name: str, options: dict[str, float]) -> None:
    assert name in AGGREGATORS
    ups = [_u(i, [float(i), 1.0], weight=2.0) for i in range(7)]
    delta, total = make_aggregator(name, **options)(ups)
    assert delta["w"].shape == (2,)
    assert total == 14.0


def _reference_weiszfeld(points: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Plain Weiszfeld in numpy float64, run to a fixed point (independent of fedloom's stopping rule)."""
    a = weights / weights.sum()
    z = a @ points
    for _ in range(10_000):
        b = a / np.linalg.norm(points - z, axis=1)
        z_new = (b @ points) / b.sum()
        if np.linalg.norm(z_new - z) < 1e-15:
            return z_new
        z = z_new
    return z


def test_geometric_median_converges_to_the_weiszfeld_point_on_eleven_points() -> None:
    rng = np.random.default_rng(7)
    points = rng.normal(size=(11, 5)) * np.array([1.0, 3.0, 0.5, 10.0, 2.0])
    weights = rng.uniform(1.0, 20.0, size=11)
    ups = [_u(i, torch.from_numpy(points[i]), float(weights[i])) for i in range(11)]
    ref = _reference_weiszfeld(points, weights)
    # The reference is the minimiser: its subgradient (here a gradient, ref is no data point) vanishes.
    diff = ref - points
    grad = ((weights / weights.sum())[:, None] * diff / np.linalg.norm(diff, axis=1)[:, None]).sum(0)
    assert np.linalg.norm(grad) < 1e-12
    got = _w(geometric_median(ups)).numpy()
    assert np.linalg.norm(got - ref) < 1e-8
