"""MNIST with a user-written training loop: Adam, gradient clipping and a cosine schedule.

The loop is ordinary PyTorch. Two calls connect it to the federation:
``ctx.optimizer()`` builds the task's optimiser with fedloom's step hook attached
(FedProx's proximal term and SCAFFOLD's correction are added to the gradients
there, after clipping, and the steps are counted), and ``ctx.batches()`` yields
this client's minibatches for the round in a seeded order.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

import fedloom
from fedloom.data.mnist import load_mnist
from fedloom.metrics import accuracy, f1
from fedloom.models.zoo import MLP2NN


def train(model: nn.Module, data: fedloom.ArrayDataset, ctx: fedloom.TrainContext) -> Mapping[str, float]:
    opt = ctx.optimizer()
    schedule = ctx.schedule(opt)
    total = torch.zeros((), dtype=torch.float64)
    for x, y in ctx.batches():
        opt.zero_grad()
        loss = ctx.loss_fn(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        opt.step()
        if schedule is not None:
            schedule.step()
        total += loss.detach()
    return {"train_loss": float(total) / max(ctx.num_steps, 1)}


def make(data_dir: str = "", train_subset: int = 0, test_subset: int = 0) -> fedloom.Task:
    """The task; ``train_subset``/``test_subset`` keep only the first examples (0 = all)."""

    def data() -> fedloom.CentralData:
        mnist = load_mnist(Path(data_dir) if data_dir else None)
        tr = mnist.train if train_subset <= 0 else mnist.train.subset(torch.arange(train_subset).numpy())
        te = mnist.test if test_subset <= 0 else mnist.test.subset(torch.arange(test_subset).numpy())
        return fedloom.CentralData(train=tr, test=te, source=mnist.source)

    return fedloom.Task(
        model=MLP2NN,
        data=data,
        optimizer=fedloom.LocalOptimizer(
            torch.optim.Adam,
            schedule=lambda opt, steps: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1)),
        ),
        metrics={"accuracy": accuracy, "f1": f1},
        train=train,
        name="mnist-custom-loop",
    )
