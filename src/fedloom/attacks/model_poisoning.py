"""Simulated model-poisoning attacks: sign flipping, scaling (model replacement), Gaussian, and ALIE.

Who is malicious. :func:`malicious_clients` draws a fixed set of
``floor(fraction * population)`` client ids once per experiment from
``numpy_rng(seed, "malicious")``; it does not change across rounds, so the
fraction of attackers in a round's cohort is hypergeometric around ``fraction``.

Per-client attacks are :class:`~fedloom.transforms.pipeline.UpdateTransform`
stages whose ``client`` hook rewrites a malicious client's delta after local
training (honest clients pass through unchanged); ``decode`` and ``server``
are identities. Put the attack stage *after* any client-side clipping or local
noise (a malicious client skips those: it controls its own code) and *before*
encoding stages such as quantisation or masking (it still speaks the protocol):

=================  ===========================================================
:class:`SignFlip`   ``delta -> -scale * delta``
:class:`Scaling`    ``delta -> boost * delta`` (model replacement, Bagdasaryan
                    et al. 2018, arXiv 1807.00459: ``boost = n / server_lr``
                    replaces the global model by the attacker's)
:class:`GaussianAttack` ``delta -> N(0, std^2 I)`` (the update is discarded)
=================  ===========================================================

:class:`ALIE` ("A little is enough", Baruch, Baruch & Goldberg 2019, arXiv
1902.06156) needs the round's benign updates, so it is an *adversary step* over
the executor's outcomes list, applied by the round loop before decoding: an
omniscient, colluding adversary that sees every benign update of the round (the
paper's attackers estimate the same statistics from their own honest data;
omniscience makes the simulation a worst case). Every malicious update of the
round becomes ``mu - z * sigma`` (coordinate-wise mean and standard deviation,
with Bessel's correction, of the benign deltas).

Notes
-----
Simulation only: the randomness comes from fedloom's derived generators, so an
attacked run is as reproducible as a clean one.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import torch

from fedloom.algorithms.api import Aggregate, ClientUpdate, ServerContext
from fedloom.core.params import Params
from fedloom.core.rng import numpy_rng, torch_rng

__all__ = ["ALIE", "GaussianAttack", "Scaling", "SignFlip", "alie_z", "malicious_clients"]

_O = TypeVar("_O")


def malicious_clients(seed: int, population: int, fraction: float) -> frozenset[int]:
    """``floor(fraction * population)`` distinct client ids from ``numpy_rng(seed, "malicious")``."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"malicious fraction must be in [0, 1], got {fraction}")
    if population < 0:
        raise ValueError(f"population must be >= 0, got {population}")
    k = math.floor(fraction * population + 1e-9)
    ids = numpy_rng(seed, "malicious").choice(population, size=k, replace=False)
    return frozenset(int(i) for i in ids)


class _ClientAttack:
    """Shared identity server hooks of the per-client attacks."""

    malicious: frozenset[int]

    def decode(self, update: ClientUpdate, ctx: ServerContext) -> ClientUpdate:
        return update

    def server(self, aggregate: Aggregate, ctx: ServerContext) -> Aggregate:
        return aggregate


@dataclass(frozen=True)
class SignFlip(_ClientAttack):
    """A malicious client sends ``-scale * delta``."""

    malicious: frozenset[int]
    scale: float = 1.0

    def client(self, update: ClientUpdate, ctx: ServerContext) -> ClientUpdate:
        if update.client_id not in self.malicious:
            return update
        return replace(update, delta=update.delta * -self.scale)


@dataclass(frozen=True)
class Scaling(_ClientAttack):
    """A malicious client sends ``boost * delta`` (model replacement when ``boost = n / server_lr``)."""

    malicious: frozenset[int]
    boost: float

    def client(self, update: ClientUpdate, ctx: ServerContext) -> ClientUpdate:
        if update.client_id not in self.malicious:
            return update
        return replace(update, delta=update.delta * self.boost)


@dataclass(frozen=True)
class GaussianAttack(_ClientAttack):
    """A malicious client sends pure ``N(0, std^2)`` noise, from ``(seed, "attack-gaussian", round, client)``."""

    malicious: frozenset[int]
    std: float

    def client(self, update: ClientUpdate, ctx: ServerContext) -> ClientUpdate:
        if update.client_id not in self.malicious:
            return update
        gen = torch_rng(ctx.seed, "attack-gaussian", round=ctx.round, client=update.client_id)
        noise = update.delta.map(lambda v: torch.randn(v.shape, generator=gen, dtype=v.dtype) * self.std)
        return replace(update, delta=noise)


def alie_z(n: int, f: int) -> float:
    """The paper's ``z_max = Phi^-1((n - s) / n)`` with ``s = floor(n / 2 + 1) - f`` supporters needed.

    ``s`` is clamped to ``[1, n - 1]`` so ``z`` stays finite when attackers are the majority.
    """
    if n < 2 or not 0 <= f <= n:
        raise ValueError(f"alie_z needs n >= 2 and 0 <= f <= n, got n={n}, f={f}")
    s = min(max(math.floor(n / 2 + 1) - f, 1), n - 1)
    return statistics.NormalDist().inv_cdf((n - s) / n)


@dataclass(frozen=True)
class ALIE:
    """The ALIE adversary step over a round's outcomes (see the module docstring).

    ``z`` fixes the shift; None uses :func:`alie_z` with ``n`` the number of
    updates in the round and ``f`` the malicious ones among them.
    """

    malicious: frozenset[int]
    z: float | None = None

    def apply(self, outcomes: Sequence[ClientUpdate | _O], ctx: ServerContext) -> list[ClientUpdate | _O]:
        """``outcomes`` with every malicious :class:`ClientUpdate` replaced by ``mu - z * sigma``.

        Failures (non-update outcomes) pass through. With fewer than two benign
        updates there is no spread to hide in and the outcomes are returned as is.
        """
        updates = [o for o in outcomes if isinstance(o, ClientUpdate)]
        benign = [u.delta for u in updates if u.client_id not in self.malicious]
        bad = sum(1 for u in updates if u.client_id in self.malicious)
        if bad == 0 or len(benign) < 2:
            return list(outcomes)
        z = self.z if self.z is not None else alie_z(len(updates), bad)
        crafted = _mean_minus_z_std(benign, z)
        return [
            replace(o, delta=crafted) if isinstance(o, ClientUpdate) and o.client_id in self.malicious else o
            for o in outcomes
        ]


def _mean_minus_z_std(deltas: Sequence[Params], z: float) -> Params:
    out: dict[str, torch.Tensor] = {}
    for k in deltas[0]:
        stacked = torch.stack([d[k] for d in deltas])  # (n_benign, *shape)
        out[k] = stacked.mean(dim=0) - z * stacked.std(dim=0, correction=1)
    return Params(out)
