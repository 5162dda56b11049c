"""Evaluation metrics: functions of a whole dataset's model outputs and targets.

A metric is any callable ``metric(outputs, targets) -> float`` where ``outputs``
are the model's outputs for every example of one evaluation set, concatenated
along the first axis, and ``targets`` the matching ``y``. Computing a metric on
the whole set (not per batch) keeps non-decomposable metrics such as AUC and F1
exact. Across clients, fedloom reports each metric's example-weighted mean and
its distribution (min, 10th percentile, median, max).

Conventions for classifiers: ``(N, C)`` outputs with ``C >= 2`` are logits over
classes; ``(N,)`` or ``(N, 1)`` outputs are one logit of the positive class
(positive when the logit is above 0, i.e. probability above 1/2).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "Metric",
    "accuracy",
    "auc",
    "distribution",
    "f1",
    "mae",
    "mse",
    "perplexity",
    "weighted_mean",
]

Metric = Callable[[torch.Tensor, torch.Tensor], float]


def _is_one_logit(outputs: torch.Tensor) -> bool:
    return outputs.ndim == 1 or (outputs.ndim == 2 and outputs.shape[1] == 1)


def _predicted_labels(outputs: torch.Tensor) -> torch.Tensor:
    if _is_one_logit(outputs):
        return (outputs.reshape(-1) > 0).to(torch.int64)
    return outputs.argmax(dim=-1)


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of examples whose predicted class equals the target (see the module docstring)."""
    if len(targets) == 0:
        return float("nan")
    pred = _predicted_labels(outputs)
    return float((pred.reshape(-1) == targets.reshape(-1).to(torch.int64)).to(torch.float64).mean())


def auc(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Area under the ROC curve of a binary classifier (Mann-Whitney U, ties counted half).

    ``outputs`` are one score per example (a logit, or two-class logits whose
    difference is used); ``targets`` are 0/1. NaN when one class is absent.
    """
    if _is_one_logit(outputs):
        score = outputs.reshape(-1)
    elif outputs.ndim == 2 and outputs.shape[1] == 2:
        score = outputs[:, 1] - outputs[:, 0]
    else:
        raise ValueError(
            f"auc needs binary outputs of shape (N,), (N, 1) or (N, 2), got {tuple(outputs.shape)}"
        )
    s = score.detach().to(torch.float64).cpu().numpy()
    y = targets.reshape(-1).detach().cpu().numpy().astype(np.int64)
    pos, neg = int((y == 1).sum()), int((y == 0).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = _average_ranks(s)
    u = float(ranks[y == 1].sum()) - pos * (pos + 1) / 2.0
    return u / (pos * neg)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean squared error over every element (outputs reshaped to the targets' shape)."""
    diff = outputs.reshape(targets.shape).to(torch.float64) - targets.to(torch.float64)
    return float((diff * diff).mean())


def mae(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean absolute error over every element (outputs reshaped to the targets' shape)."""
    diff = outputs.reshape(targets.shape).to(torch.float64) - targets.to(torch.float64)
    return float(diff.abs().mean())


def perplexity(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """``exp`` of the mean cross-entropy of class logits ``(N, C)`` or ``(N, T, C)`` against ids."""
    logits = outputs.reshape(-1, outputs.shape[-1]).to(torch.float64)
    ce = torch.nn.functional.cross_entropy(logits, targets.reshape(-1).to(torch.int64))
    return float(torch.exp(ce))


def f1(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """F1 score: of the positive class for binary outputs, else the macro average over classes."""
    pred = _predicted_labels(outputs).reshape(-1)
    true = targets.reshape(-1).to(torch.int64)
    classes = [1] if _is_one_logit(outputs) or outputs.shape[-1] == 2 else list(range(outputs.shape[-1]))
    scores = []
    for c in classes:
        tp = int(((pred == c) & (true == c)).sum())
        fp = int(((pred == c) & (true != c)).sum())
        fn = int(((pred != c) & (true == c)).sum())
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    """``sum(w v) / sum(w)`` over the finite values (NaN when none)."""
    pairs = [(v, w) for v, w in zip(values, weights, strict=True) if np.isfinite(v)]
    total = sum(w for _, w in pairs)
    if not pairs or total <= 0:
        return float("nan")
    return float(sum(v * w for v, w in pairs) / total)


def distribution(values: Sequence[float]) -> Mapping[str, float]:
    """``min``, ``p10``, ``median`` and ``max`` of the finite values across clients."""
    arr = np.array([v for v in values if np.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return {"min": float("nan"), "p10": float("nan"), "median": float("nan"), "max": float("nan")}
    return {
        "min": float(arr.min()),
        "p10": float(np.percentile(arr, 10)),
        "median": float(np.median(arr)),
        "max": float(arr.max()),
    }
