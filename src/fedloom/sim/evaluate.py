"""Evaluation of a parameter set on a dataset: the task's loss and metrics."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from fedloom.algorithms.api import Workspace
from fedloom.algorithms.local import load_params
from fedloom.core.errors import TaskError
from fedloom.core.params import Params
from fedloom.data.datasets import ArrayDataset

__all__ = ["EvalResult", "evaluate"]


@dataclass(frozen=True)
class EvalResult:
    """Example-averaged ``loss`` and every task metric (by name) on ``num_examples`` examples."""

    loss: float
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)


def evaluate(workspace: Workspace, params: Params, data: ArrayDataset, *, batch_size: int) -> EvalResult:
    """The task's loss and metrics of ``params`` on ``data`` (eval mode, no grad).

    The loss is the batch losses' mean weighted by batch size; each metric is
    computed once on the outputs of the whole dataset, so metrics that do not
    decompose over batches (AUC, F1) are exact. A metric that raises is a
    :class:`TaskError` naming it.
    """
    load_params(workspace, params)
    module = workspace.module
    module.eval()
    dev = workspace.device
    total_loss = torch.zeros((), dtype=torch.float64)
    outputs: list[torch.Tensor] = []
    n = len(data)
    with torch.no_grad():
        for begin in range(0, n, batch_size):
            xb, yb = data.batch(slice(begin, begin + batch_size))
            xb, yb = xb.to(dev), yb.to(dev)
            out = module(xb)
            total_loss += workspace.loss_fn(out, yb).to("cpu", torch.float64) * len(yb)
            if workspace.metrics:
                outputs.append(out.detach().to("cpu"))
    values: dict[str, float] = {}
    if workspace.metrics and n > 0:
        all_out = torch.cat(outputs)
        for name, metric in workspace.metrics.items():
            try:
                values[name] = float(metric(all_out, data.y))
            except Exception as exc:
                raise TaskError(
                    f"metric {name!r} failed on outputs of shape {tuple(all_out.shape)} and targets of "
                    f"shape {tuple(data.y.shape)}: {type(exc).__name__}: {exc}"
                ) from exc
    return EvalResult(loss=float(total_loss) / max(n, 1), num_examples=n, metrics=values)
