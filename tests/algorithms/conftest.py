"""Tiny clients for hand-computed algorithm tests.

A scalar linear model ``w * x`` with squared error, ``L(w) = mean((w x_j - y_j)^2)``.
Regression targets are not class labels, so each example's label is its row index
and the loss looks its target up (as in ``test_fedavg_golden.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
from torch import nn

from fedloom.algorithms import Workspace
from fedloom.core.params import Params
from fedloom.data.datasets import ArrayDataset

ToyClient = Callable[[Sequence[float], Sequence[float]], tuple[Workspace, ArrayDataset]]


class IndexedMSE(nn.Module):
    """``mean((pred - targets[labels])^2)``."""

    def __init__(self, targets: torch.Tensor) -> None:
        super().__init__()
        self.targets = targets

    def forward(self, pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.mean((pred - self.targets[labels]) ** 2)


def make_toy_client(xs: Sequence[float], ys: Sequence[float]) -> tuple[Workspace, ArrayDataset]:
    data = ArrayDataset(torch.tensor(list(xs)).reshape(-1, 1), torch.arange(len(xs), dtype=torch.int64))
    ws = Workspace(nn.Linear(1, 1, bias=False), loss_fn=IndexedMSE(torch.tensor(list(ys)).reshape(-1, 1)))
    return ws, data


@pytest.fixture
def toy_client() -> ToyClient:
    return make_toy_client


def scalar(w: float) -> Params:
    return Params({"weight": torch.tensor([[w]])})


@pytest.fixture
def scalar_params() -> Callable[[float], Params]:
    return scalar


def make_logreg_clients(sizes: Sequence[int], seed: int = 0) -> list[tuple[Workspace, ArrayDataset]]:
    """Random 5-feature, 3-class logistic-regression clients sharing one model shape."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        x = torch.randn(n, 5, generator=gen)
        y = torch.randint(0, 3, (n,), generator=gen)
        out.append((Workspace(nn.Linear(5, 3)), ArrayDataset(x, y, 3)))
    return out


@pytest.fixture
def logreg_clients() -> Callable[[Sequence[int]], list[tuple[Workspace, ArrayDataset]]]:
    return make_logreg_clients


@pytest.fixture
def logreg_params() -> Params:
    gen = torch.Generator().manual_seed(1)
    return Params({"weight": torch.randn(3, 5, generator=gen) * 0.1, "bias": torch.zeros(3)})
