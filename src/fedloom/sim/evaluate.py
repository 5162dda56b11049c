"""Evaluation of a parameter set on a dataset: mean loss and accuracy."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedloom.algorithms.api import Workspace
from fedloom.algorithms.local import load_params
from fedloom.core.params import Params
from fedloom.data.datasets import ArrayDataset

__all__ = ["EvalResult", "evaluate"]


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    num_examples: int


def evaluate(workspace: Workspace, params: Params, data: ArrayDataset, *, batch_size: int) -> EvalResult:
    """Example-averaged loss and accuracy of ``params`` on ``data`` (eval mode, no grad)."""
    load_params(workspace, params)
    module = workspace.module
    module.eval()
    loss_fn = workspace.loss_fn
    total_loss = torch.zeros((), dtype=torch.float64)
    correct = 0
    n = len(data)
    with torch.no_grad():
        for begin in range(0, n, batch_size):
            xb, yb = data.x[begin : begin + batch_size], data.y[begin : begin + batch_size]
            logits = module(xb)
            total_loss += loss_fn(logits, yb).double() * len(yb)
            correct += int((logits.argmax(dim=1) == yb).sum())
    return EvalResult(loss=float(total_loss) / max(n, 1), accuracy=correct / max(n, 1), num_examples=n)
