"""Differentially private update transforms: central DP-FedAvg, client-side clipping, local DP.

All three are :class:`~fedloom.transforms.pipeline.UpdateTransform` stages over
client deltas (McMahan et al. 2018, "Learning Differentially Private Recurrent
Language Models", arXiv 1710.06963):

:class:`CentralDP`
    the (trusted) server clips each received delta to L2 norm ``C`` in
    ``decode`` and adds ``N(0, (σC)^2)`` per coordinate to the *sum* in ``server``.
:class:`ClientClipDP`
    each client clips before sending; the server rejects any delta above ``C``
    (a tampered client) and adds the same noise to the sum.
:class:`LocalDP`
    each client clips and adds ``N(0, (σC)^2)`` to its own delta; the server adds
    nothing.

The estimator (central variants). ``decode`` sets every weight to 1, so the
aggregator (:func:`~fedloom.algorithms.aggregate.weighted_mean`) returns the
uniform mean ``S / n`` of the ``n`` accepted clipped deltas with
``total_weight == n``. ``server`` rebuilds the sum ``S``, adds the noise and
divides by a denominator ``D``::

    delta_hat = (S + N(0, σ²C² I)) / D,   noise std on delta_hat = σC / D

``D`` is ``expected_clients`` when given (McMahan et al.'s fixed-denominator
estimator ``f_f``: unbiased under Poisson sampling, and the one the Poisson
analysis covers), else the actual count ``n`` (for fixed-size sampling without
failures ``n`` is the public cohort size, so both coincide). Examples-weighted
FedAvg is *not* used: a client's weight ``n_k`` would raise its sensitivity
above ``C``.

Notes
-----
Threat model. Central DP protects against everyone who sees the *released*
models (other clients, the analyst, whoever reads checkpoints); the server
sees raw deltas and is trusted to clip and add noise honestly. Client-side
clipping moves clipping out of the server, but the noise is still the server's:
use it with secure aggregation so the server only sees the sum. Local DP trusts
nobody but costs ``sqrt(n)`` more noise on the mean (std ``σC / sqrt(n)``
versus ``σC / n``). Only the delta is privatised: weights, example counts and
metrics (e.g. ``train_loss``) travel and are reported in the clear. The
server-side noise generator is derived from ``(seed, "dp-noise", round)``, local
noise also from the client id; a simulation secret, not a secure source:
a real deployment must draw noise from a cryptographically secure generator.
Combining these stages with a robust aggregator voids the accounting: the
sensitivity argument needs the plain sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from fedloom.algorithms.api import Aggregate, ClientUpdate, ServerContext
from fedloom.core.errors import UpdateError
from fedloom.core.params import Params
from fedloom.core.rng import noise_rng

__all__ = [
    "CentralDP",
    "ClientClipDP",
    "LocalDP",
    "clip_to_norm",
    "gaussian_like",
    "noised_mean",
]

NOISE_PURPOSE = "dp-noise"


def clip_to_norm(delta: Params, bound: float) -> tuple[Params, float]:
    """``delta * min(1, bound / ||delta||_2)`` and the pre-clip norm ``||delta||_2``."""
    norm = delta.l2_norm()
    if norm <= bound:
        return delta, norm
    return delta * (bound / norm), norm


def gaussian_like(params: Params, std: float, generator: torch.Generator) -> Params:
    """Independent ``N(0, std^2)`` noise shaped like ``params``, drawn in key order from ``generator``."""
    return params.map(
        lambda v: torch.randn(v.shape, generator=generator, dtype=v.dtype, device="cpu").to(v.device) * std
    )


def noised_mean(
    aggregate: Aggregate, *, noise_std_on_sum: float, denominator: float | None, generator: torch.Generator
) -> Aggregate:
    """``(S + N(0, noise_std_on_sum^2)) / D`` from a uniform-weight mean aggregate (see module docstring).

    ``S = aggregate.delta * aggregate.num_clients``; ``D`` is ``denominator`` or,
    when None, ``aggregate.num_clients``. An empty aggregate (a Poisson draw that
    selected nobody; its ``delta`` is zeros) still releases ``N(0, ...) / D`` when
    ``D`` is fixed -- skipping the release would reveal that the round was empty --
    and is returned as is otherwise. Raises :class:`UpdateError` when the
    aggregate's weights were not uniform.
    """
    n = aggregate.num_clients
    if n == 0:
        if denominator is None:
            return aggregate
        noise = gaussian_like(aggregate.delta, noise_std_on_sum, generator)
        return replace(aggregate, delta=noise / float(denominator))
    if abs(aggregate.total_weight - n) > 1e-6 * n:
        raise UpdateError(
            f"DP noise needs a uniform-weight mean (total_weight == num_clients), got total_weight "
            f"{aggregate.total_weight} for {n} clients; use weighted_mean after a DP decode stage"
        )
    d = float(n) if denominator is None else float(denominator)
    total = aggregate.delta * float(n)
    noisy = total + gaussian_like(total, noise_std_on_sum, generator)
    return replace(aggregate, delta=noisy / d)


def _check(clip_norm: float, noise_multiplier: float, expected_clients: int | None, what: str) -> None:
    problems = []
    if not clip_norm > 0 or not math.isfinite(clip_norm):
        problems.append(f"{what}.clip_norm must be a finite number > 0, got {clip_norm}")
    if not noise_multiplier >= 0 or not math.isfinite(noise_multiplier):
        problems.append(f"{what}.noise_multiplier must be a finite number >= 0, got {noise_multiplier}")
    if expected_clients is not None and expected_clients < 1:
        problems.append(f"{what}.expected_clients must be >= 1 or None, got {expected_clients}")
    if problems:
        raise ValueError("; ".join(problems))


def _uniform(update: ClientUpdate, norm: float, delta: Params) -> ClientUpdate:
    return replace(update, delta=delta, weight=1.0, metrics={**update.metrics, "update_norm": norm})


@dataclass(frozen=True)
class CentralDP:
    """DP-FedAvg with server-side clipping: clip in ``decode``, noise the sum in ``server``.

    Noise std on the sum is ``noise_multiplier * clip_norm``; on the released mean
    ``noise_multiplier * clip_norm / D`` with ``D = expected_clients or n``.
    """

    clip_norm: float
    noise_multiplier: float
    expected_clients: int | None = None
    secure_noise: bool = False  # draw noise from the OS CSPRNG (deployment), not the seed

    def __post_init__(self) -> None:
        _check(self.clip_norm, self.noise_multiplier, self.expected_clients, "CentralDP")

    def client(self, update: ClientUpdate, ctx: ServerContext) -> ClientUpdate:
        return update

    def decode(self, update: ClientUpdate, ctx: ServerContext) -> ClientUpdate:
        delta, norm = clip_to_norm(update.delta, self.clip_norm)
        return _uniform(update, norm, delta)

    def server(self, aggregate: Aggregate, ctx: ServerContext) -> Aggregate:
        gen = noise_rng(ctx.seed, NOISE_PURPOSE, round=ctx.round, secure=self.secure_noise)
        return noised_mean(
            aggregate,
            noise_std_on_sum=self.noise_multiplier * self.clip_norm,
            denominator=self.expected_clients,
            generator=gen,
        )


@dataclass(frozen=True)
class ClientClipDP:
    """DP-FedAvg with client-side clipping; the server verifies the bound and noises the sum."""

    clip_norm: float
    noise_multiplier: float
    expected_clients: int | None = None
    secure_noise: bool = False  # draw noise from the OS CSPRNG (deployment), not the seed

    def __post_init__(self) -> None:
        _check(self.clip_norm, self.noise_multiplier, self.expected_clients, "ClientClipDP")

    def client(self, update: ClientUpdate, ctx: ServerContext) -> ClientUpdate:
        # The pre-clip norm is not reported: it would leave the client un-noised.
        delta, _ = clip_to_norm(update.delta, self.clip_norm)
        return replace(update, delta=delta)

    def decode(self, update: ClientUpdate, ctx: ServerContext) -> ClientUpdate:
        norm = update.delta.l2_norm()
        # An honest client clipped already; a larger norm would break the sensitivity bound.
        if norm > self.clip_norm * (1 + 1e-5):
            raise UpdateError(
                f"client {update.client_id}: update norm {norm:.6g} exceeds the DP clip norm {self.clip_norm}"
            )
        return replace(update, weight=1.0)

    def server(self, aggregate: Aggregate, ctx: ServerContext) -> Aggregate:
        gen = noise_rng(ctx.seed, NOISE_PURPOSE, round=ctx.round, secure=self.secure_noise)
        return noised_mean(
            aggregate,
            noise_std_on_sum=self.noise_multiplier * self.clip_norm,
            denominator=self.expected_clients,
            generator=gen,
        )


@dataclass(frozen=True)
class LocalDP:
    """Local DP: each client clips to ``clip_norm`` and adds ``N(0, (noise_multiplier * clip_norm)^2)``.

    The server takes the uniform mean of the noised deltas (noise std on it
    ``noise_multiplier * clip_norm / sqrt(n)``); ``decode`` only sets weights to 1.
    Account with :func:`fedloom.privacy.accounting.local_epsilon` per client.
    """

    clip_norm: float
    noise_multiplier: float
    secure_noise: bool = False  # draw noise from the OS CSPRNG (deployment), not the seed

    def __post_init__(self) -> None:
        _check(self.clip_norm, self.noise_multiplier, None, "LocalDP")

    def client(self, update: ClientUpdate, ctx: ServerContext) -> ClientUpdate:
        delta, _ = clip_to_norm(update.delta, self.clip_norm)  # pre-clip norm not reported: it leaks
        gen = noise_rng(
            ctx.seed, NOISE_PURPOSE, round=ctx.round, client=update.client_id, secure=self.secure_noise
        )
        noisy = delta + gaussian_like(delta, self.noise_multiplier * self.clip_norm, gen)
        return replace(update, delta=noisy)

    def decode(self, update: ClientUpdate, ctx: ServerContext) -> ClientUpdate:
        return replace(update, weight=1.0)

    def server(self, aggregate: Aggregate, ctx: ServerContext) -> Aggregate:
        return aggregate
