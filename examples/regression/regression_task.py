"""A regression task: each client fits y = x . w_c + noise with its own shifted coefficients.

Run it with ``fedloom simulate --config examples/regression/regression.toml``; the
experiment file names this module (``task = "regression_task:make"``), which
fedloom finds next to the experiment file.
"""

from __future__ import annotations

import torch
from torch import nn

import fedloom
from fedloom.metrics import mae, mse


def make(num_clients: int = 20, features: int = 8, heterogeneity: float = 0.3, seed: int = 0) -> fedloom.Task:
    """Linear regression over ``num_clients`` clients whose true coefficients differ by ``heterogeneity``."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(features, generator=gen)
    train, test = [], []
    for _ in range(num_clients):
        w_c = w + heterogeneity * torch.randn(features, generator=gen)
        n = int(torch.randint(20, 80, (), generator=gen))
        x = torch.randn(n + 20, features, generator=gen)
        y = x @ w_c + 0.1 * torch.randn(n + 20, generator=gen)
        train.append(fedloom.ArrayDataset(x[:n], y[:n]))
        test.append(fedloom.ArrayDataset(x[n:], y[n:]))
    return fedloom.Task(
        model=lambda: nn.Linear(features, 1),
        data=fedloom.ClientData(
            train=train, client_test=test, source=f"linear regression, {num_clients} clients"
        ),
        loss=lambda out, y: nn.functional.mse_loss(out.reshape(-1), y),
        optimizer=fedloom.LocalOptimizer(torch.optim.SGD, {"momentum": 0.9}),
        metrics={"mse": mse, "mae": mae},
        name="regression",
    )
