"""DP, robust aggregation, attacks and secure aggregation driven through the real round loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from fedloom import ArrayDataset, ClientData, Task
from fedloom.config import load_config
from fedloom.config.schema import ExperimentConfig
from fedloom.core.errors import ConfigError
from fedloom.privacy.accounting import FixedSizeSampling, epsilon
from fedloom.results.store import RunStore
from fedloom.sim.build import build_components
from fedloom.sim.runner import run_simulation

BASE = (
    "data.dataset=synthetic", "data.num_clients=20", "model.name=logreg", "model.kwargs={in_features = 60}",
    "sampling.fraction=0.25", "client.lr=0.05", "client.batch_size=10", "eval.target_accuracy=0",
    "executor=sequential", "seed=3",
)  # fmt: skip


def _cfg(*sets: str) -> ExperimentConfig:
    return load_config(None, (*BASE, *sets))


def _metrics(run: Path) -> list[dict[str, float]]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_central_dp_reports_the_accountants_epsilon_and_stops_at_the_budget(tmp_path: Path) -> None:
    sets = ("privacy.mode=central", "privacy.noise_multiplier=1.0", "privacy.clip_norm=0.5")
    run_simulation(_cfg(*sets, "rounds=3"), tmp_path / "a")
    rows = _metrics(tmp_path / "a")
    expected = [epsilon(1.0, FixedSizeSampling(5, 20), r, 1e-5) for r in (1, 2, 3)]
    assert [r["epsilon"] for r in rows] == pytest.approx(expected)
    assert rows[0]["epsilon"] < rows[1]["epsilon"] < rows[2]["epsilon"]
    budget = (expected[1] + expected[2]) / 2  # allows two rounds, not three
    result = run_simulation(_cfg(*sets, "rounds=10", f"privacy.budget_epsilon={budget}"), tmp_path / "b")
    assert result.stop_reason == "privacy budget reached"
    assert result.final_round == 2


def test_target_epsilon_calibrates_noise_without_overshooting(tmp_path: Path) -> None:
    cfg = _cfg("privacy.mode=central", "privacy.target_epsilon=4.0", "rounds=4")
    comps = build_components(cfg)
    assert comps.privacy is not None
    sigma = comps.privacy.noise_multiplier
    assert epsilon(sigma, FixedSizeSampling(5, 20), 4, 1e-5) <= 4.0
    assert epsilon(sigma * 0.95, FixedSizeSampling(5, 20), 4, 1e-5) > 4.0 * 0.98


def test_adaptive_clip_state_is_checkpointed_and_resume_is_exact(tmp_path: Path) -> None:
    sets = ("privacy.mode=adaptive", "privacy.noise_multiplier=0.5", "privacy.clip_norm=0.05",
            "privacy.count_noise_std=1.0")  # fmt: skip
    whole = run_simulation(_cfg(*sets, "rounds=4"), tmp_path / "whole")
    run_simulation(_cfg(*sets, "rounds=2"), tmp_path / "part")
    resumed = run_simulation(_cfg(*sets, "rounds=4"), tmp_path / "part", resume=True)
    assert whole.state.params.equal(resumed.state.params)
    clip = whole.state.algo_state["dp_adaptive_clip"]["clip_norm"]
    assert float(clip[0]) != 0.05  # the clip norm moved from its initial value
    with RunStore(tmp_path / "part" / "state.sqlite") as store:
        assert (
            store.load_state()
            .algo_state["dp_adaptive_clip"]
            .equal(whole.state.algo_state["dp_adaptive_clip"])
        )


def test_robust_aggregator_resists_a_scaling_attack(tmp_path: Path) -> None:
    attack = ("attack.kind=scaling", "attack.fraction=0.2", "attack.boost=100.0", "rounds=3")
    mean = run_simulation(_cfg(*attack), tmp_path / "mean")
    median = run_simulation(_cfg(*attack, "robust.aggregator=median"), tmp_path / "median")
    clean = run_simulation(_cfg("rounds=3"), tmp_path / "clean")
    dist_mean = (mean.state.params - clean.state.params).l2_norm()
    dist_median = (median.state.params - clean.state.params).l2_norm()
    assert dist_median * 10 < dist_mean


def test_secure_aggregation_matches_plain_aggregation(tmp_path: Path) -> None:
    common = ("transforms.clip_norm=5.0", "rounds=2")
    plain = run_simulation(_cfg(*common), tmp_path / "plain")
    secure = run_simulation(
        _cfg(*common, "secagg.enabled=true", "secagg.dropout_after_masking=0.2"), tmp_path / "secure"
    )
    assert plain.state.params.allclose(secure.state.params, rtol=0, atol=1e-4)
    assert not plain.state.params.equal(secure.state.params)  # it really went through fixed point


@pytest.mark.parametrize("mode", ["client_clip", "local"])
def test_secure_aggregation_under_client_side_dp_matches_the_plain_dp_run(tmp_path: Path, mode: str) -> None:
    # The clients clip to privacy.clip_norm, which bounds the fixed-point range; the DP noise is
    # seeded, so the secure run must reach the plain run's model up to the fixed-point rounding.
    common = (f"privacy.mode={mode}", "privacy.clip_norm=0.5", "privacy.noise_multiplier=0.3", "rounds=2")
    assert _cfg(*common, "secagg.enabled=true").update_norm_bound() == 0.5
    plain = run_simulation(_cfg(*common), tmp_path / "plain")
    secure = run_simulation(_cfg(*common, "secagg.enabled=true"), tmp_path / "secure")
    assert plain.state.params.allclose(secure.state.params, rtol=0, atol=1e-4)
    assert not plain.state.params.equal(secure.state.params)  # it really went through fixed point
    assert _metrics(tmp_path / "secure")[-1]["epsilon"] == _metrics(tmp_path / "plain")[-1]["epsilon"]


def test_incompatible_combinations_are_rejected() -> None:
    with pytest.raises(ConfigError, match=r"robust\.aggregator = 'mean'"):
        _cfg("privacy.mode=central", "robust.aggregator=median")
    with pytest.raises(ConfigError, match=r"secagg\.enabled needs bounded updates"):
        _cfg("secagg.enabled=true")
    with pytest.raises(ConfigError, match=r"secagg\.enabled needs bounded updates"):
        _cfg("secagg.enabled=true", "privacy.mode=central")
    with pytest.raises(ConfigError, match=r"attack\.fraction > 0"):
        _cfg("attack.kind=sign_flip")
    with pytest.raises(ConfigError, match="aggregator 'krum': bad options"):
        build_components(_cfg("robust.aggregator=krum", "robust.options={nope = 1}"))


def test_a_tasks_natural_clients_are_the_population_the_accountant_assumes(tmp_path: Path) -> None:
    # Four natural clients while data.num_clients keeps its default of 100: cohorts of 2 are drawn
    # from the task's 4 clients, so epsilon is that of sampling 2 of 4, not 25 of 100.
    gen = torch.Generator().manual_seed(0)
    clients = [
        ArrayDataset(torch.randn(8, 3, generator=gen), torch.randint(0, 2, (8,), generator=gen))
        for _ in range(4)
    ]
    task = Task(model=lambda: nn.Linear(3, 2), data=lambda: ClientData(train=clients), name="four-sites")
    cfg = load_config(None, ["sampling.fraction=0.25", "sampling.min_clients=2", "rounds=2", "executor=sequential",
                             "eval.target_accuracy=0", "privacy.mode=central", "privacy.noise_multiplier=1.0",
                             "privacy.clip_norm=0.5"])  # fmt: skip
    assert cfg.data.num_clients == 100
    comps = build_components(cfg, task=task)
    assert comps.privacy is not None
    assert (comps.privacy.population, comps.privacy.cohort) == (4, 2)
    run_simulation(cfg, tmp_path / "run", components=comps)
    rows = _metrics(tmp_path / "run")
    assert [r["num_clients"] for r in rows] == [2, 2]
    expected = [epsilon(1.0, FixedSizeSampling(2, 4), r, 1e-5) for r in (1, 2)]
    assert [r["epsilon"] for r in rows] == pytest.approx(expected)
