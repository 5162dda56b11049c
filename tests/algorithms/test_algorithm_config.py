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
