"""The deployed server's last check before a round's new global model may be committed.

Every update was checked on its own when it arrived (:mod:`fedloom.net.coordinator`),
but some harm shows only in the aggregate: FedNova's coefficients grow with a step
count that one client reports, a sum of large updates overflows, an algorithm
raises on a combination of updates. :func:`guarded_apply` runs the round's server
step (:func:`~fedloom.sim.server_round.apply_updates`) and refuses a result that is
not a usable model (:func:`model_problem`). Then each update is left out in turn;
those whose removal alone makes the result usable are blamed and the step runs
again without them. When that fails too, no new model comes out of the attempt and
every one of its updates is blamed (the round is retried; clients are asked again).

No exception from the server step escapes: a round's updates can end an attempt,
never the server. The leave-one-out search runs only on that failure path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from fedloom.algorithms.api import Aggregate, Algorithm, ClientUpdate, ServerContext, ServerState
from fedloom.core.errors import FedloomError
from fedloom.core.params import Params
from fedloom.sim.server_round import apply_updates
from fedloom.transforms.pipeline import Pipeline

__all__ = ["OVERFLOW_SQUARE", "Guarded", "guarded_apply", "model_problem", "square_norm"]

#: An update (delta and extras together) or a global model whose squared L2 norm reaches this,
#: float32's largest value, is refused whatever bound is configured: norms, distances and forward
#: passes computed on it in float32 overflow (one element of 3e38 makes a model whose test loss is NaN).
OVERFLOW_SQUARE = float(torch.finfo(torch.float32).max)


def square_norm(items: Sequence[Params]) -> float:
    """The sum of the squares of every element of ``items`` (in float64, tensor by tensor)."""
    return math.fsum(
        float(torch.linalg.vector_norm(v if v.is_floating_point() else v.double(), dtype=torch.float64)) ** 2
        for p in items
        for v in p.values()
    )


@dataclass(frozen=True)
class Guarded:
    """The outcome of :func:`guarded_apply`.

    ``state`` is the new server state (``None``: the attempt yields no usable model, and ``reason``
    says why); ``blamed`` maps the client ids of updates left out to the reason.
    """

    state: ServerState | None
    blamed: dict[int, str] = field(default_factory=dict)
    reason: str = ""


def model_problem(params: Params) -> str | None:
    """Why ``params`` cannot become the global model (non-finite values, or a squared L2 norm that
    overflows float32), or ``None``."""
    square = square_norm([params])  # one pass: NaN or infinity make it NaN or infinite too
    if square < OVERFLOW_SQUARE:
        return None
    if not params.all_finite():
        return "the new global model has NaN or infinite values"
    return f"the new global model's squared L2 norm overflows float32 (norm {math.sqrt(square):.3g})"


def _attempt(
    algorithm: Algorithm,
    pipeline: Pipeline,
    state: ServerState,
    updates: Sequence[ClientUpdate],
    ctx: ServerContext,
    precomputed: Aggregate | None,
) -> tuple[ServerState | None, str]:
    try:
        new, _ = apply_updates(algorithm, pipeline, state, updates, ctx, precomputed=precomputed)
    except (
        Exception
    ) as exc:  # the step over untrusted updates: any failure is this attempt's, not the server's
        kind = "" if isinstance(exc, FedloomError) else f"{type(exc).__name__}: "
        return None, f"aggregation failed: {kind}{exc}"[:500]
    why = model_problem(new.params)
    return (new, "") if why is None else (None, why)


def guarded_apply(
    algorithm: Algorithm,
    pipeline: Pipeline,
    state: ServerState,
    updates: Sequence[ClientUpdate],
    ctx: ServerContext,
    *,
    precomputed: Aggregate | None = None,
) -> Guarded:
    """The round's server step over ``updates`` (sorted by client id), refusing an unusable result.

    See the module docstring. ``precomputed``: the secure sum's aggregate (no individual update
    to blame: an unusable result ends the attempt).
    """
    new, why = _attempt(algorithm, pipeline, state, updates, ctx, precomputed)
    if new is not None:
        return Guarded(new)
    r = ctx.round
    blamed: dict[int, str] = {}
    if precomputed is None and len(updates) > 1:
        for u in updates:
            rest = [v for v in updates if v is not u]
            if _attempt(algorithm, pipeline, state, rest, ctx, None)[0] is not None:
                blamed[u.client_id] = (
                    f"update of round {r} left out: with it {why}; the round's other updates make a usable model"
                )
        kept = [u for u in updates if u.client_id not in blamed]
        if blamed and kept:
            new, again = _attempt(algorithm, pipeline, state, kept, ctx, None)
            if new is not None:
                return Guarded(new, blamed)
            why = f"{why}; without {sorted(blamed)}: {again}"
    everyone = {u.client_id: f"update of round {r} dropped with its attempt: {why}" for u in updates}
    return Guarded(None, everyone, why)
