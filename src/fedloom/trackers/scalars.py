"""The scalars a tracker logs for one round: the numeric values of its metrics row, flattened."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["round_scalars", "tag"]

# MLflow allows letters, digits and ``_ - . / space`` in metric names; TensorBoard takes any tag.
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-./ ]")


def tag(*parts: str) -> str:
    """A metric name from path parts joined by ``/``, characters MLflow refuses replaced by ``_``."""
    return "/".join(_UNSAFE.sub("_", p) for p in parts)


def round_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Every finite number in a round's metrics row, keyed by its tag.

    Top-level values keep their key (``test_accuracy``, ``train_loss``, ``epsilon``, ...);
    values in a nested mapping are tagged by their path (``sites/<site>/<metric>``). The
    ``round`` key is the step, not a scalar; booleans, strings, ``None`` (a value that was
    non-finite or undefined) and non-finite floats are left out.
    """
    out: dict[str, float] = {}

    def walk(prefix: tuple[str, ...], row: Mapping[str, Any]) -> None:
        for k, v in row.items():
            path = (*prefix, str(k))
            if isinstance(v, Mapping):
                walk(path, v)
            elif isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                out[tag(*path)] = float(v)

    walk((), {k: v for k, v in metrics.items() if k != "round"})
    return out
