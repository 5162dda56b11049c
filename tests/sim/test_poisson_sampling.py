"""Poisson client sampling: its distribution, its accounting (RDP and PLD) and empty rounds in the loop."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from dp_accounting import dp_event, pld

from fedloom.config import load_config
from fedloom.config.schema import ExperimentConfig
from fedloom.core.errors import ConfigError
from fedloom.core.rng import noise_rng
from fedloom.privacy.accounting import PoissonSampling, epsilon
from fedloom.results.store import RunStore
from fedloom.sim.privacy_plan import plan_privacy
from fedloom.sim.runner import run_simulation
from fedloom.sim.sampling import draw_cohort, poisson_clients
from fedloom.transforms.dp import gaussian_like

BASE = (
    "data.dataset=synthetic", "data.num_clients=10", "model.name=logreg", "model.kwargs={in_features = 60}",
    "sampling.scheme=poisson", "sampling.fraction=0.1", "client.lr=0.05", "client.batch_size=10",
    "eval.target_accuracy=0", "executor=sequential", "seed=3", "rounds=6", "checkpoint.keep=0",
)  # fmt: skip


def _cfg(*sets: str) -> ExperimentConfig:
    return load_config(None, (*BASE, *sets))


def _metrics(run: Path) -> list[dict[str, float]]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_poisson_cohorts_have_binomial_sizes_and_uniform_inclusion() -> None:
    population, rate, rounds = 1000, 0.1, 400
    cohorts = [poisson_clients(7, r, population, rate) for r in range(1, rounds + 1)]
    for c in cohorts[:20]:
        assert np.array_equal(c, np.unique(c))  # sorted, distinct
    assert np.array_equal(cohorts[4], poisson_clients(7, 5, population, rate))  # depends on (seed, round)
    sizes = np.array([len(c) for c in cohorts])
    # Binomial(1000, 0.1): mean 100, variance 90 (a fixed-size scheme would have variance 0).
    assert abs(sizes.mean() - 100) < 5 * np.sqrt(90 / rounds)
    assert 60 < sizes.var(ddof=1) < 130
    counts = np.bincount(np.concatenate(cohorts), minlength=population)
    # Each client in Binomial(400, 0.1) rounds: mean 40, std 6.
    assert abs(counts.mean() - 40) < 1
    assert 4.5 < counts.std() < 7.5


def test_draw_cohort_dispatches_on_the_scheme() -> None:
    fixed = draw_cohort(1, 2, 50, scheme="fixed", fraction=0.2, min_clients=1)
    assert len(fixed) == 10
    poisson = draw_cohort(1, 2, 50, scheme="poisson", fraction=0.2, min_clients=1)
    assert np.array_equal(poisson, poisson_clients(1, 2, 50, 0.2))
    with pytest.raises(ValueError, match="scheme"):
        draw_cohort(1, 2, 50, scheme="bernoulli", fraction=0.2, min_clients=1)


def test_config_ties_pld_to_poisson_and_refuses_a_cohort_floor() -> None:
    with pytest.raises(ConfigError, match=r"sampling\.scheme = 'poisson'"):
        load_config(None, ["privacy.mode=central", "privacy.accountant=pld"])
    load_config(None, ["privacy.mode=central", "privacy.accountant=pld", "sampling.scheme=poisson"])
    with pytest.raises(ConfigError, match=r"sampling\.min_clients = 3"):
        load_config(None, ["sampling.scheme=poisson", "sampling.min_clients=3"])


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_poisson_plan_accounts_with_the_poisson_event(accountant: str) -> None:
    sets = ("privacy.mode=central", "privacy.noise_multiplier=1.3", f"privacy.accountant={accountant}")
    plan = plan_privacy(_cfg(*sets, "data.num_clients=200"))
    assert plan is not None
    assert plan.cohort == 20  # the expected cohort, the fixed denominator of the noised mean
    assert plan.stage.expected_clients == 20  # type: ignore[attr-defined]
    want = epsilon(1.3, PoissonSampling(0.1), 7, 1e-5, accountant=accountant)  # type: ignore[arg-type]
    assert plan.epsilon_after(7) == pytest.approx(want, rel=1e-12)
    if accountant == "pld":  # and straight from dp-accounting, composed by hand
        acc = pld.PLDAccountant(value_discretization_interval=1e-4)
        acc.compose(dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(1.3)), 7)
        assert plan.epsilon_after(7) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)


def test_empty_rounds_release_noise_under_dp_and_nothing_without(tmp_path: Path) -> None:
    sizes = [len(poisson_clients(3, r, 10, 0.1)) for r in range(1, 7)]
    assert 0 in sizes, f"the seed must draw an empty round: {sizes}"
    assert any(sizes), f"the seed must draw a non-empty round: {sizes}"
    empty = sizes.index(0) + 1

    run_simulation(_cfg(), tmp_path / "plain")
    rows = _metrics(tmp_path / "plain")
    assert [r["num_clients"] for r in rows] == sizes
    assert rows[empty - 1]["train_loss"] is None
    with RunStore(tmp_path / "plain" / "state.sqlite", create=False) as store:
        before, after = store.load_state(empty - 1).params, store.load_state(empty).params
    assert all(torch.equal(before[k], after[k]) for k in before)  # nobody drawn: model unchanged

    sigma, clip = 0.8, 0.5
    dp = (
        "privacy.mode=central", f"privacy.noise_multiplier={sigma}", f"privacy.clip_norm={clip}",
        "privacy.accountant=pld",
    )  # fmt: skip
    run_simulation(_cfg(*dp), tmp_path / "dp")
    rows = _metrics(tmp_path / "dp")
    eps = [r["epsilon"] for r in rows]
    assert eps == sorted(eps)
    assert len(set(eps)) == len(eps)
    with RunStore(tmp_path / "dp" / "state.sqlite", create=False) as store:
        before, after = store.load_state(empty - 1).params, store.load_state(empty).params
    # FedAvg (server lr 1) applies (0 + N(0, (sigma C)^2)) / D with D = the expected cohort, 1.
    gen = noise_rng(3, "dp-noise", round=empty)
    noise = gaussian_like(before.map(torch.zeros_like), sigma * clip, gen)
    for k in before:
        assert torch.allclose(after[k], before[k] + noise[k] / 1.0, rtol=0, atol=1e-6)
        assert not torch.equal(after[k], before[k])


def test_the_deployment_refuses_poisson_sampling(tmp_path: Path) -> None:
    pytest.importorskip("grpc")
    from fedloom.net.logs import JsonLog
    from fedloom.net.server import ServerOptions, run_server

    with pytest.raises(ConfigError, match="fixed-size cohorts"):
        run_server(_cfg(), tmp_path / "srv", ServerOptions(listen="127.0.0.1:0"), JsonLog("server"))


def test_adaptive_clipping_releases_its_count_on_an_empty_round(tmp_path: Path) -> None:
    sizes = [len(poisson_clients(3, r, 10, 0.1)) for r in range(1, 7)]
    empty = sizes.index(0) + 1
    sets = (
        "privacy.mode=adaptive",
        "privacy.noise_multiplier=0.8",
        "privacy.clip_norm=0.5",
        "privacy.count_noise_std=1.0",
    )
    run_simulation(_cfg(*sets), tmp_path / "adaptive")
    with RunStore(tmp_path / "adaptive" / "state.sqlite", create=False) as store:
        before, after = store.load_state(empty - 1), store.load_state(empty)
    clip = [float(s.algo_state["dp_adaptive_clip"]["clip_norm"].item()) for s in (before, after)]
    assert clip[0] != clip[1]  # the noised count of nobody moved the clip norm
    assert not all(torch.equal(before.params[k], after.params[k]) for k in before.params)
