"""DP-FedAvg with adaptive clipping (Andrew, Thakkar, McMahan & Ramaswamy 2021, arXiv 1905.03871).

Each round the server clips every delta to the current norm ``C_t`` and records
the bit ``b_i = 1[||delta_i|| <= C_t]``. It releases the privatised fraction of
unclipped updates, with the bits centred to ``b_i - 1/2`` (sensitivity 1/2)::

    b_hat = (sum_i (b_i - 1/2) + N(0, σ_b²)) / D + 1/2

and moves ``C`` geometrically toward the target quantile ``γ``::

    C_{t+1} = C_t * exp(-η_C * (b_hat - γ))

The delta noise multiplier ``z_Δ`` is chosen so that the delta release and the
count release together are a Gaussian mechanism with multiplier ``z``
(``z^-2 = z_Δ^-2 + (2σ_b)^-2``, the paper's Theorem 1); account with ``z``.

State. ``C_t`` is the only state; it lives in ``ServerState.algo_state`` under
:data:`STATE_KEY` as ``Params({"clip_norm": float64 tensor of shape (1,)})`` and
so is checkpointed and resumed with the model. A stage is stateless: the round
loop *binds* it to the state before the round (:func:`bind_pipeline`) and asks
it for the next state after aggregation (:func:`advance_pipeline`), which it
merges into the new ``ServerState.algo_state``. The count noise comes from
``(seed, "dp-clip-count", round)``, so a resumed run reproduces every ``C_t``.

Notes
-----
Clipping happens on the server (``decode``), so this variant trusts the server
with raw deltas, like :class:`~fedloom.transforms.dp.CentralDP`. The bits are
computed from client data and must only leave the server noised; the raw count
is never reported in metrics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

import torch

from fedloom.algorithms.api import Aggregate, ClientUpdate, ServerContext
from fedloom.algorithms.stragglers import accepted
from fedloom.core.errors import RunStateError
from fedloom.core.params import Params
from fedloom.core.rng import noise_rng
from fedloom.transforms.dp import NOISE_PURPOSE, clip_to_norm, noised_mean
from fedloom.transforms.pipeline import Pipeline, UpdateTransform

__all__ = [
    "STATE_KEY",
    "UNCLIPPED",
    "AdaptiveClipDP",
    "StatefulTransform",
    "advance_pipeline",
    "bind_pipeline",
    "delta_noise_multiplier",
    "next_clip_norm",
    "noised_unclipped_fraction",
]

STATE_KEY = "dp_adaptive_clip"  # no "/": serde uses it as a separator
UNCLIPPED = "dp_unclipped"
COUNT_PURPOSE = "dp-clip-count"


def delta_noise_multiplier(total: float, count_noise_std: float) -> float:
    """``z_Δ = (z^-2 - (2σ_b)^-2)^(-1/2)``; needs ``2σ_b > z`` (else the count alone spends the budget)."""
    if not 2 * count_noise_std > total > 0:
        raise ValueError(
            f"adaptive clipping needs 0 < noise_multiplier < 2 * count_noise_std, got "
            f"noise_multiplier={total}, count_noise_std={count_noise_std}"
        )
    return float((total**-2 - (2 * count_noise_std) ** -2) ** -0.5)


def noised_unclipped_fraction(
    unclipped: int, n: int, denominator: float, count_noise_std: float, generator: torch.Generator
) -> float:
    """``(unclipped - n/2 + N(0, σ_b²)) / D + 1/2``: the privatised fraction of unclipped deltas."""
    noise = float(torch.randn((), generator=generator, dtype=torch.float64)) * count_noise_std
    return (unclipped - n / 2 + noise) / denominator + 0.5


def next_clip_norm(clip: float, fraction: float, target_quantile: float, lr: float) -> float:
    """The geometric update ``C * exp(-lr * (fraction - target_quantile))``."""
    return clip * math.exp(-lr * (fraction - target_quantile))


@runtime_checkable
class StatefulTransform(Protocol):
    """A transform whose per-round parameters come from ``ServerState.algo_state``."""

    def bind(self, algo_state: Mapping[str, Params]) -> UpdateTransform: ...

    def advance(self, updates: Sequence[ClientUpdate], ctx: ServerContext) -> dict[str, Params]: ...


@dataclass(frozen=True)
class AdaptiveClipDP:
    """Central DP-FedAvg whose clip norm tracks the ``target_quantile`` of update norms.

    ``noise_multiplier`` is the *total* ``z`` (give it to the accountant);
    ``count_noise_std`` is σ_b (the paper suggests expected cohort / 20);
    ``clip_lr`` is η_C (0.2 in the paper). ``clip_norm`` is the bound for this
    round, set by :meth:`bind`; None means ``initial_clip`` (round 1).
    """

    noise_multiplier: float
    count_noise_std: float
    initial_clip: float = 0.1
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    expected_clients: int | None = None
    clip_norm: float | None = None
    secure_noise: bool = False  # draw noise from the OS CSPRNG (deployment), not the seed

    def __post_init__(self) -> None:
        problems = []
        if not self.initial_clip > 0:
            problems.append(f"AdaptiveClipDP.initial_clip must be > 0, got {self.initial_clip}")
        if not 0 <= self.target_quantile <= 1:
            problems.append(f"AdaptiveClipDP.target_quantile must be in [0, 1], got {self.target_quantile}")
        if not self.clip_lr > 0:
            problems.append(f"AdaptiveClipDP.clip_lr must be > 0, got {self.clip_lr}")
        if self.expected_clients is not None and self.expected_clients < 1:
            problems.append(f"AdaptiveClipDP.expected_clients must be >= 1, got {self.expected_clients}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            problems.append(f"AdaptiveClipDP.clip_norm must be > 0, got {self.clip_norm}")
        if problems:
            raise ValueError("; ".join(problems))
        delta_noise_multiplier(self.noise_multiplier, self.count_noise_std)  # validates the pair

    @property
    def current_clip(self) -> float:
        return self.initial_clip if self.clip_norm is None else self.clip_norm

    # ---- state ----------------------------------------------------------
    def bind(self, algo_state: Mapping[str, Params]) -> AdaptiveClipDP:
        """This stage with the clip norm stored in ``algo_state`` (``initial_clip`` if absent)."""
        stored = algo_state.get(STATE_KEY)
        if stored is None:
            return replace(self, clip_norm=None)
        if "clip_norm" not in stored or stored["clip_norm"].numel() != 1:
            raise RunStateError(f"algo_state[{STATE_KEY!r}] must hold one 'clip_norm' value, got {stored!r}")
        return replace(self, clip_norm=float(stored["clip_norm"].item()))

    def advance(self, updates: Sequence[ClientUpdate], ctx: ServerContext) -> dict[str, Params]:
        """The next round's state from this round's decoded updates.

        With no update, ``C_t`` is kept -- unless the denominator is fixed
        (``expected_clients``, as under Poisson sampling), in which case the noised
        count of zero is released like any other, so the clip trajectory does not
        reveal an empty round.
        """
        kept = accepted(updates)
        clip = self.current_clip
        if kept or self.expected_clients:
            bits = sum(int(u.metrics.get(UNCLIPPED, 0.0) > 0) for u in kept)
            denom = float(self.expected_clients or len(kept))
            gen = noise_rng(ctx.seed, COUNT_PURPOSE, round=ctx.round, secure=self.secure_noise)
            frac = noised_unclipped_fraction(bits, len(kept), denom, self.count_noise_std, gen)
            clip = next_clip_norm(clip, frac, self.target_quantile, self.clip_lr)
        return {STATE_KEY: Params({"clip_norm": torch.tensor([clip], dtype=torch.float64)})}

    # ---- transform hooks ------------------------------------------------
    def client(self, update: ClientUpdate, ctx: ServerContext) -> ClientUpdate:
        return update

    def decode(self, update: ClientUpdate, ctx: ServerContext) -> ClientUpdate:
        clip = self.current_clip
        delta, norm = clip_to_norm(update.delta, clip)
        metrics = {**update.metrics, "update_norm": norm, UNCLIPPED: float(norm <= clip)}
        return replace(update, delta=delta, weight=1.0, metrics=metrics)

    def server(self, aggregate: Aggregate, ctx: ServerContext) -> Aggregate:
        z_delta = delta_noise_multiplier(self.noise_multiplier, self.count_noise_std)
        gen = noise_rng(ctx.seed, NOISE_PURPOSE, round=ctx.round, secure=self.secure_noise)
        return noised_mean(
            aggregate,
            noise_std_on_sum=z_delta * self.current_clip,
            denominator=self.expected_clients,
            generator=gen,
        )


def bind_pipeline(pipeline: Pipeline, algo_state: Mapping[str, Params]) -> Pipeline:
    """``pipeline`` with every :class:`StatefulTransform` bound to ``algo_state`` (others as they are)."""
    stages = [s.bind(algo_state) if isinstance(s, StatefulTransform) else s for s in pipeline.stages]
    return Pipeline(tuple(stages))


def advance_pipeline(
    pipeline: Pipeline, updates: Sequence[ClientUpdate], ctx: ServerContext
) -> dict[str, Params]:
    """The merged next-round state of every stateful stage, to put into ``ServerState.algo_state``."""
    out: dict[str, Params] = {}
    for s in pipeline.stages:
        if isinstance(s, StatefulTransform):
            out.update(s.advance(updates, ctx))
    return out
