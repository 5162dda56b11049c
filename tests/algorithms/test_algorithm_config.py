"""The algorithm and server sections of the experiment file select and check the algorithms."""

from __future__ import annotations

import pytest

from fedloom.algorithms import (
    FedAvg,
    FedNova,
    FedProx,
    Scaffold,
    ServerAdagrad,
    ServerAdam,
    ServerSGD,
    ServerYogi,
)
from fedloom.config import load_config
from fedloom.core.errors import ConfigError
from fedloom.sim.build import build_algorithm


@pytest.mark.parametrize(
    ("overrides", "kind"),
    [
        ((), FedAvg),
        (("algorithm.name=fedprox", "algorithm.mu=1.0"), FedProx),
        (("algorithm.name=scaffold", "algorithm.scaffold_option=I"), Scaffold),
        (("algorithm.name=fednova",), FedNova),
    ],
)
def test_algorithm_is_selected_by_name(overrides: tuple[str, ...], kind: type) -> None:
    algo = build_algorithm(load_config(None, overrides))
    assert isinstance(algo, kind)


def test_options_reach_the_algorithm() -> None:
    cfg = load_config(
        None,
        (
            "algorithm.name=scaffold",
            "algorithm.scaffold_option=I",
            "algorithm.straggler_fraction=0.9",
            "server.optimizer=yogi",
            "server.lr=0.03",
            "server.beta2=0.999",
            "server.tau=0.01",
        ),
    )
    algo = build_algorithm(cfg)
    assert isinstance(algo, Scaffold)
    assert algo.option == "I"
    assert algo.stragglers.fraction == 0.9
    assert algo.server_optimizer == ServerYogi(lr=0.03, beta1=0.9, beta2=0.999, tau=0.01)


@pytest.mark.parametrize(
    ("optimizer", "kind"),
    [("sgd", ServerSGD), ("adam", ServerAdam), ("yogi", ServerYogi), ("adagrad", ServerAdagrad)],
)
def test_server_optimizer_is_selected(optimizer: str, kind: type) -> None:
    algo = build_algorithm(load_config(None, (f"server.optimizer={optimizer}",)))
    assert isinstance(algo, FedAvg)
    assert isinstance(algo.server_optimizer, kind)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("algorithm.name=fedprox", "algorithm.drop_stragglers=true"), "accepts partial work"),
        (("server.optimizer=adam", "server.momentum=0.9"), "server.beta1"),
        (("algorithm.name=scaffold", "algorithm.scaffold_option=III"), "algorithm.scaffold_option"),
        (("algorithm.straggler_fraction=1.5",), "algorithm.straggler_fraction"),
        (("algorithm.mu=-1.0",), "algorithm.mu"),
        (("server.tau=0.0",), "server.tau"),
        (("server.beta1=1.0",), "server.beta1"),
    ],
)
def test_invalid_choices_are_named(overrides: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        ("algorithm.name=scaffold", "server.weighting=examples"),
        ("privacy.mode=central", "server.weighting=examples"),
    ],
)
def test_explicit_example_weighting_is_refused_where_the_mean_is_uniform(overrides: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError, match=r"server\.weighting = 'examples' does not apply"):
        load_config(None, overrides)
    # Unset (the default) or uniform, the same runs are accepted.
    load_config(None, overrides[:1])
    load_config(None, (overrides[0], "server.weighting=uniform"))


def test_weighting_reaches_fedavg_fedprox_and_fednova() -> None:
    for name, kind in (("fedavg", FedAvg), ("fedprox", FedProx), ("fednova", FedNova)):
        uniform = build_algorithm(load_config(None, (f"algorithm.name={name}", "server.weighting=uniform")))
        default = build_algorithm(load_config(None, (f"algorithm.name={name}",)))
        assert isinstance(uniform, kind)
        assert isinstance(default, kind)
        assert (uniform.weighting, default.weighting) == ("uniform", "examples")
