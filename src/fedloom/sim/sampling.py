"""Seeded client selection."""

from __future__ import annotations

import math

import numpy as np

from fedloom.core.rng import numpy_rng

__all__ = ["cohort_size", "sample_clients"]


def cohort_size(population: int, fraction: float, min_clients: int) -> int:
    """``max(min_clients, ceil(fraction * population))``, capped at the population."""
    return min(population, max(min_clients, math.ceil(fraction * population - 1e-9)))


def sample_clients(seed: int, round: int, population: int, size: int) -> np.ndarray:
    """``size`` distinct client ids drawn uniformly without replacement, sorted ascending.

    The draw depends only on ``(seed, round)``, never on earlier rounds, so a
    resumed run selects the same cohorts as an uninterrupted one.
    """
    rng = numpy_rng(seed, "client-sampling", round=round)
    return np.sort(rng.choice(population, size=size, replace=False)).astype(np.int64)
