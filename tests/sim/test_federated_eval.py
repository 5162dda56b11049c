"""Federated evaluation: the example-weighted accuracy of the global model on sampled clients' data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedloom.config import load_config
from fedloom.core.rng import numpy_rng
from fedloom.sim.build import build_components
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
    # Independent of fedloom's evaluation: a fresh linear layer holding the final weights.
    w, b = result.state.params["linear.weight"], result.state.params["linear.bias"]
    total = correct = 0.0
    loss = 0.0
    for cid in chosen:
        data = comps.train.client_data(int(cid))
        logits = data.x @ w.T + b
        total += len(data)
        correct += float((logits.argmax(dim=1) == data.y).sum())
        loss += float(torch.nn.functional.cross_entropy(logits, data.y, reduction="sum"))
    assert result.final_metrics["fed_accuracy"] == pytest.approx(correct / total, rel=1e-12)
    assert result.final_metrics["fed_loss"] == pytest.approx(loss / total, rel=1e-5)
