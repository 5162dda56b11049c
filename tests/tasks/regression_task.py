"""A user's regression task with its own training loop, as a module next to an experiment file.

The runtime tests copy this file into a fresh directory and name it ``task = "regression_task:make"``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

import fedloom
from fedloom.metrics import mae, mse


def make(num_clients: int = 6, seed: int = 0, fail_client: int = -1) -> fedloom.Task:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 1, generator=gen)
    clients = []
    for c in range(num_clients):
        x = torch.randn(10 + 3 * c, 4, generator=gen)
        clients.append(
            fedloom.ArrayDataset(x, (x @ w).reshape(-1) + 0.1 * torch.randn(len(x), generator=gen))
        )
    x_test = torch.randn(40, 4, generator=gen)
    test = fedloom.ArrayDataset(x_test, (x_test @ w).reshape(-1))

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(out.reshape(-1), y)

    def train(model: nn.Module, data: fedloom.ArrayDataset, ctx: fedloom.TrainContext) -> Mapping[str, float]:
        if ctx.client_id == fail_client:
            raise RuntimeError("this client's device is broken")
        opt = ctx.optimizer()
        sched = ctx.schedule(opt)
        total = 0.0
        for xb, yb in ctx.batches():
            opt.zero_grad()
            batch_loss = loss(model(xb), yb)
            batch_loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            if sched is not None:
                sched.step()
            total += float(batch_loss.detach())
        return {"train_loss": total / max(ctx.num_steps, 1)}

    return fedloom.Task(
        model=lambda: nn.Linear(4, 1),
        data=fedloom.ClientData(train=clients, test=test),
        loss=loss,
        optimizer=fedloom.LocalOptimizer(
            torch.optim.Adam,
            {"weight_decay": 1e-4},
            schedule=lambda opt, steps: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1)),
        ),
        metrics={"mse": mse, "mae": mae},
        train=train,
        name="regression",
    )
