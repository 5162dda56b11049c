"""Every algorithm and server optimiser resumes bit-identically through the runner's checkpoints.

Two rounds, then a resume to four, must end with the same parameters, optimiser
slots and algorithm state (SCAFFOLD's control variates, persisted per client in
the state database) as an uninterrupted four-round run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fedloom.config import load_config
from fedloom.config.schema import ExperimentConfig
from fedloom.sim.build import Components, build_algorithm, build_components
from fedloom.sim.runner import run_simulation

BASE = (
    'data.dataset="synthetic"',
    "data.num_clients=8",
    "model.name=logreg",
    "model.kwargs={in_features = 60}",
    "sampling.fraction=0.5",
    "client.steps=4",
    "client.lr=0.02",
    "eval.target_accuracy=0.0",
    "checkpoint.keep=0",
    "executor=sequential",
)
VARIANTS = {
    "fedavg": (),
    "fedavgm": ("server.momentum=0.9",),
    "fedadam": ("server.optimizer=adam", "server.lr=0.01"),
    "fedyogi": ("server.optimizer=yogi", "server.lr=0.01"),
    "fedadagrad": ("server.optimizer=adagrad", "server.lr=0.01"),
    "fedavg-drop": ("algorithm.straggler_fraction=0.5", "algorithm.drop_stragglers=true"),
    "fedprox": ("algorithm.name=fedprox", "algorithm.mu=0.1", "algorithm.straggler_fraction=0.5"),
    "scaffold-I": ("algorithm.name=scaffold", 'algorithm.scaffold_option="I"'),
    "scaffold-II": ("algorithm.name=scaffold", "algorithm.straggler_fraction=0.3", "server.lr=0.9"),
    "fednova": ("algorithm.name=fednova", "client.steps=0", "client.epochs=1"),
    "scaffold-adam": ("algorithm.name=scaffold", "server.optimizer=adam", "server.lr=0.01"),
}


@pytest.fixture(scope="module")
def data_components() -> Components:
    # Generating Synthetic(1, 1) dominates the cost; every variant shares the data and model.
    return build_components(load_config(None, BASE))


def _config(name: str, rounds: int) -> ExperimentConfig:
    return load_config(None, (*BASE, *VARIANTS[name], f"rounds={rounds}"))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_resume_is_bit_identical(name: str, tmp_path: Path, data_components: Components) -> None:
    cfg4, cfg2 = _config(name, 4), _config(name, 2)
    comps = dataclasses.replace(data_components, algorithm=build_algorithm(cfg4))
    full = run_simulation(cfg4, tmp_path / "full", components=comps)
    part = run_simulation(cfg2, tmp_path / "part", components=comps)
    assert part.final_round == 2
    resumed = run_simulation(cfg4, tmp_path / "part", resume=True, components=comps)
    assert (full.final_round, resumed.final_round) == (4, 4)
    assert resumed.state.params.equal(full.state.params)
    assert not resumed.state.params.equal(part.state.params)
    assert resumed.state.opt_state.keys() == full.state.opt_state.keys()
    for key, slot in full.state.opt_state.items():
        assert resumed.state.opt_state[key].equal(slot)
    assert resumed.state.algo_state.keys() == full.state.algo_state.keys()
    for key, value in full.state.algo_state.items():
        assert resumed.state.algo_state[key].equal(value)
    if name.startswith("scaffold"):
        assert full.state.algo_state["control"].l2_norm() > 0
