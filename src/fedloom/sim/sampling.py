"""Seeded client selection."""

from __future__ import annotations

import hashlib
import math

import numpy as np

from fedloom.core.rng import numpy_rng

__all__ = ["cohort_size", "draw_cohort", "poisson_clients", "sample_clients", "secret_sample"]


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


def secret_sample(secret: bytes, round: int, candidates: list[int], size: int) -> list[int]:
    """``size`` of ``candidates`` drawn uniformly without replacement from ``(secret, round)``, sorted.

    The deployed server draws DP cohorts this way, from a secret it generates at run start and
    never sends: a draw from the experiment seed, which every client receives, lets any client
    predict the cohorts, so the privacy analysis could not count on the selection being random.
    Deterministic in ``(secret, round, candidates, size)``, so a resumed run draws the same cohorts.
    """
    if not 0 <= size <= len(candidates):
        raise ValueError(f"cannot draw {size} of {len(candidates)} candidates")
    key = hashlib.blake2b(secret, digest_size=16, person=b"fedloom-cohort", salt=round.to_bytes(16, "little"))
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(key.digest(), "little")))
    ordered = sorted(candidates)
    return sorted(ordered[int(i)] for i in rng.choice(len(ordered), size=size, replace=False))


def poisson_clients(seed: int, round: int, population: int, rate: float) -> np.ndarray:
    """Poisson sampling: each client is in the cohort independently with probability ``rate``.

    Drawn as ``k ~ Binomial(population, rate)`` then ``k`` distinct ids uniformly,
    which is the same distribution as ``population`` coin flips but costs O(k),
    not O(population). Sorted ascending; may be empty. Depends only on
    ``(seed, round)``, like :func:`sample_clients`.
    """
    if not 0 < rate <= 1:
        raise ValueError(f"rate must be in (0, 1], got {rate}")
    rng = numpy_rng(seed, "client-sampling-poisson", round=round)
    k = int(rng.binomial(population, rate))
    return np.sort(rng.choice(population, size=k, replace=False)).astype(np.int64)


def draw_cohort(
    seed: int, round: int, population: int, *, scheme: str, fraction: float, min_clients: int
) -> np.ndarray:
    """The round's cohort under the configured ``sampling.scheme``.

    ``"fixed"``: :func:`sample_clients` of :func:`cohort_size` clients;
    ``"poisson"``: :func:`poisson_clients` with rate ``fraction`` (``min_clients``
    does not apply: a floor on the cohort would break the Poisson analysis).
    """
    if scheme == "poisson":
        return poisson_clients(seed, round, population, fraction)
    if scheme != "fixed":
        raise ValueError(f"sampling scheme must be 'fixed' or 'poisson', got {scheme!r}")
    return sample_clients(seed, round, population, cohort_size(population, fraction, min_clients))
