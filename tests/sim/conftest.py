"""Small experiments shared by the executor tests."""

from __future__ import annotations

import pytest

from fedloom.config import load_config
from fedloom.config.schema import ExperimentConfig
from fedloom.sim.build import Components, build_components


def mnist_config(mnist_dir: str, *extra: str) -> ExperimentConfig:
    sets = [
        f"data.dir={mnist_dir}", "data.train_subset=3000", "data.test_subset=500", "data.num_clients=30",
        "sampling.fraction=0.3", "rounds=3", "client.batch_size=20", "eval.target_accuracy=0",
        "eval.every=3", "seed=3", *extra,
    ]  # fmt: skip
    return load_config(None, sets)


@pytest.fixture(scope="module")
def mnist_2nn(mnist_dir: str) -> tuple[ExperimentConfig, Components]:
    cfg = mnist_config(mnist_dir)
    return cfg, build_components(cfg)
