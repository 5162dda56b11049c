"""Client-side local training: minibatch SGD from the broadcast parameters.

Algorithms that change local training (FedProx's proximal term, SCAFFOLD's
control-variate correction) pass a :class:`GradCorrection` that adjusts the
gradients in place before each step; the loop itself is shared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from fedloom.algorithms.api import ClientContext, Workspace
from fedloom.core.errors import TrainingError
from fedloom.core.params import Params
from fedloom.data.datasets import ArrayDataset

__all__ = ["GradCorrection", "LocalResult", "LocalSGD", "load_params", "local_sgd"]


@dataclass(frozen=True)
class LocalSGD:
    """Local training hyper-parameters.

    ``epochs`` passes over the local data in minibatches of ``batch_size`` (the
    last batch may be smaller), unless ``steps > 0``, in which case exactly
    ``steps`` minibatch steps are taken, reshuffling at each pass.
    """

    lr: float = 0.05
    epochs: int = 1
    batch_size: int = 10
    steps: int = 0

    def num_steps(self, num_examples: int) -> int:
        """Number of SGD steps for a client with ``num_examples`` examples."""
        if self.steps > 0:
            return self.steps
        return self.epochs * math.ceil(num_examples / self.batch_size)


class GradCorrection(Protocol):
    """Adds an algorithm's term to the gradients, in place, before each SGD step.

    ``params`` and ``grads`` are the workspace's trainable tensors in
    ``named_parameters`` order.
    """

    def __call__(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None: ...


@dataclass(frozen=True)
class LocalResult:
    """``delta`` is ``trained - start``."""

    delta: Params
    num_steps: int
    mean_loss: float


def load_params(workspace: Workspace, params: Params) -> None:
    """Copy ``params`` into the workspace module's tensors in place."""
    with torch.no_grad():
        for name, tensor in workspace.module.state_dict(keep_vars=True).items():
            tensor.copy_(params[name])


def local_sgd(
    workspace: Workspace,
    start: Params,
    data: ArrayDataset,
    cfg: LocalSGD,
    ctx: ClientContext,
    *,
    correction: GradCorrection | None = None,
    max_steps: int | None = None,
) -> LocalResult:
    """Run local SGD from ``start`` on ``data``; return the change ``trained - start``.

    Minibatch order is drawn from ``ctx.rng("local-shuffle")``, so the result
    depends only on (seed, round, client). ``max_steps`` truncates the work
    (a straggler that finishes early). Raises :class:`TrainingError` if the loss
    becomes NaN or infinite.
    """
    n = len(data)
    if n == 0:
        raise TrainingError(f"client {ctx.client_id} has no training examples")
    module = workspace.module
    load_params(workspace, start)
    module.train()
    named = dict(module.named_parameters())
    params: list[torch.Tensor] = [named[name] for name in workspace.trainable]
    total_steps = cfg.num_steps(n)
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    gen = ctx.rng("local-shuffle")
    loss_sum = torch.zeros((), dtype=torch.float64)
    step = 0
    while step < total_steps:
        order = torch.randperm(n, generator=gen)
        for begin in range(0, n, cfg.batch_size):
            if step >= total_steps:
                break
            idx = order[begin : begin + cfg.batch_size]
            xb, yb = data.x[idx], data.y[idx]
            for p in params:
                p.grad = None
            loss = workspace.loss_fn(module(xb), yb)
            loss.backward()
            with torch.no_grad():
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                if correction is not None:
                    correction([p.detach() for p in params], grads)
                torch._foreach_add_(params, grads, alpha=-cfg.lr)
            loss_sum += loss.detach()
            step += 1
    mean_loss = float(loss_sum) / max(step, 1)
    if not math.isfinite(mean_loss):
        raise TrainingError(
            f"round {ctx.round}, client {ctx.client_id}: training loss became {mean_loss} "
            f"(learning rate {cfg.lr} may be too high)"
        )
    delta = Params({k: v.detach() - start[k] for k, v in module.state_dict().items()})
    return LocalResult(delta=delta, num_steps=step, mean_loss=mean_loss)
