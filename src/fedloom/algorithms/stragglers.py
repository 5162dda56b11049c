"""Systems heterogeneity: stragglers that finish only part of their local work.

FedProx (Li et al. 2020, arXiv 1812.06127, §5.2) simulates devices that cannot
finish a round's local work: a fraction of the selected clients are stragglers
that complete only a uniformly random amount of it. FedAvg then either *drops*
them (the paper's FedAvg baseline) or *accepts their partial work* (as FedProx
does).

Here each selected client is a straggler independently with probability
``fraction``, and a straggler runs ``s ~ Uniform{1, ..., full_steps - 1}`` local
steps (one step when ``full_steps == 1``). Both draws come from the client's
generator ``ctx.rng("straggler")``, i.e. from ``(seed, round, client,
"straggler")``. The decision therefore needs no knowledge of the rest of the
cohort, so it is made the same way by every runtime -- sequential, vectorised,
Ray, or a real device deciding for itself -- and does not depend on scheduling.
In expectation a ``fraction`` of the cohort straggles (the paper fixes the
count exactly; with ``fraction = 0.9`` and 10 clients a round, about 35% of
rounds here have no non-straggler at all).

A dropped straggler still answers, with a zero delta, ``num_steps = 0``,
``num_examples = 0`` and the metric ``dropped = 1.0``; algorithms remove such
updates with :func:`accepted` before aggregating. Answering instead of failing
keeps a round whose every client was dropped a valid, empty round (the model
stays where it is) rather than an error that stops the run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedloom.algorithms.api import ClientContext, ClientUpdate
from fedloom.algorithms.local import LocalResult
from fedloom.core.params import Params

__all__ = [
    "StragglerPlan",
    "Stragglers",
    "accepted",
    "dropped_update",
    "straggler_metrics",
]

DROPPED = "dropped"
STRAGGLER = "straggler"


@dataclass(frozen=True)
class StragglerPlan:
    """One client's work for a round: ``steps`` local steps, fewer than full if ``straggler``."""

    straggler: bool
    steps: int


@dataclass(frozen=True)
class Stragglers:
    """Straggler simulation: ``fraction`` in ``[0, 1]``; ``drop`` discards stragglers' work."""

    fraction: float = 0.0
    drop: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"Stragglers.fraction must lie in [0, 1], got {self.fraction}")

    def plan(self, full_steps: int, ctx: ClientContext) -> StragglerPlan:
        """Decide whether this client straggles this round and how many steps it completes."""
        if self.fraction <= 0.0 or full_steps < 1:
            return StragglerPlan(straggler=False, steps=full_steps)
        gen = ctx.rng(STRAGGLER)
        if float(torch.rand((), generator=gen, dtype=torch.float64)) >= self.fraction:
            return StragglerPlan(straggler=False, steps=full_steps)
        if full_steps == 1:
            return StragglerPlan(straggler=True, steps=1)
        steps = int(torch.randint(1, full_steps, (), generator=gen))
        return StragglerPlan(straggler=True, steps=steps)


def dropped_update(ctx: ClientContext, start: Params) -> ClientUpdate:
    """The answer of a straggler whose work is discarded: no delta, no weight in any mean."""
    return ClientUpdate(
        client_id=ctx.client_id,
        delta=start.zeros_like(),
        weight=0.0,
        num_examples=0,
        num_steps=0,
        metrics={STRAGGLER: 1.0, DROPPED: 1.0},
    )


def accepted(updates: Sequence[ClientUpdate]) -> list[ClientUpdate]:
    """The updates that take part in aggregation (all but dropped stragglers), in the given order."""
    return [u for u in updates if u.metrics.get(DROPPED, 0.0) == 0.0]


def straggler_metrics(plan: StragglerPlan, result: LocalResult) -> dict[str, float]:
    """What training reported (``train_loss``...), plus ``straggler = 1`` for kept partial work."""
    metrics = dict(result.metrics)
    if math.isfinite(result.mean_loss):
        metrics["train_loss"] = result.mean_loss
    if plan.straggler:
        metrics[STRAGGLER] = 1.0
    return metrics
