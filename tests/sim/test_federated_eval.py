"""Federated evaluation: the example-weighted accuracy of the global model on sampled clients' data."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedloom.config import load_config
from fedloom.core.rng import numpy_rng
from fedloom.sim.build import build_components
from fedloom.sim.evaluate import evaluate
from fedloom.sim.runner import run_simulation


def test_federated_metrics_match_an_independent_evaluation(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "data.dataset=synthetic", "data.num_clients=12", "model.name=logreg",
            "model.kwargs={in_features = 60}", "rounds=2", "eval.federated=true", "eval.federated_clients=5",
            "eval.target_accuracy=0", "executor=sequential", "seed=4",
        ],
    )  # fmt: skip
    result = run_simulation(cfg, tmp_path / "run")
    comps = build_components(cfg)
    chosen = numpy_rng(cfg.seed, "federated-eval", round=2).choice(12, size=5, replace=False)
    total = correct = 0.0
    for cid in chosen:
        ev = evaluate(comps.workspace, result.state.params, comps.train.client_data(int(cid)), batch_size=100)
        total += ev.num_examples
        correct += ev.accuracy * ev.num_examples
    assert result.final_metrics["fed_accuracy"] == pytest.approx(correct / total)
    assert result.final_metrics["fed_loss"] > 0
