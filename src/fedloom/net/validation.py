"""What an update must pass before it counts in a deployed round (no grpc here).

:func:`validate_update` checks a decoded update against the round's broadcast: names,
shapes and dtypes against the global model, what the algorithm requires of an update
(its extras, a least step count: see :mod:`fedloom.algorithms.requirements`),
finiteness, a squared L2 norm that float32 can hold (below
:data:`~fedloom.net.guard.OVERFLOW_SQUARE`, whatever the configured bound), the
configured norm bound and the weight cap. Under ``deploy.weighting = "uniform"`` every
accepted update then gets weight 1. The checks before it (the round it names, the
sender's selection, duplicates, the broadcast it was trained on) are the
:class:`~fedloom.net.coordinator.Coordinator`'s; the pipeline's own ``decode`` checks
come after.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from fedloom.algorithms.api import Broadcast, ClientUpdate
from fedloom.algorithms.requirements import UNDECLARED, UpdateRequirements, check_update
from fedloom.core.errors import FedloomError, UpdateError
from fedloom.core.serde import data_all_finite, data_square_sum
from fedloom.net.guard import OVERFLOW_SQUARE, square_norm

__all__ = ["MAX_REASON", "Limits", "cut", "one_pass", "rejection_reason", "validate_update"]

#: Reasons, failure reports and names written to the audit table and the log are cut to this length.
MAX_REASON = 500


@dataclass(frozen=True)
class Limits:
    """What the server accepts of an update (see :class:`~fedloom.net.coordinator.Coordinator`)."""

    requirements: UpdateRequirements = UNDECLARED
    max_norm: float = 0.0
    max_weight: float = 0.0
    uniform: bool = False


def validate_update(
    update: ClientUpdate,
    broadcast: Broadcast,
    limits: Limits,
    *,
    client: str,
    finite: bool | None = None,
    square: float | None = None,
) -> ClientUpdate:
    """``update`` as it takes part (reweighted under uniform weighting), or raise
    :class:`UpdateError` naming what is wrong with it.

    ``finite``: the blob's one-pass finiteness (see :func:`~fedloom.core.serde.data_all_finite`),
    ``True`` skips the per-tensor checks, which otherwise name the tensor that is not finite;
    ``square``: the blob's one-pass sum of squares (:func:`~fedloom.core.serde.data_square_sum`;
    ``None``: summed here, tensor by tensor).
    """
    params, r = broadcast.params, broadcast.round
    params.check_compatible(update.delta, what="update delta")
    check_update(limits.requirements, update, params, client=client, round=r)
    if finite is not True and not update.delta.all_finite():
        raise UpdateError("update delta contains NaN or infinite values")
    for name, extra in update.extras.items():
        if finite is not True and not extra.all_finite():
            raise UpdateError(f"update extra {name!r} contains NaN or infinite values")
        if set(extra) <= set(params):
            for k, v in extra.items():
                ref = params[k]
                if v.shape != ref.shape or v.dtype != ref.dtype:
                    raise UpdateError(
                        f"update extra {name!r} parameter {k!r} has shape {tuple(v.shape)} "
                        f"{v.dtype}, expected {tuple(ref.shape)} {ref.dtype}"
                    )
    if square is None:
        square = square_norm([update.delta, *update.extras.values()])
    if not square < OVERFLOW_SQUARE:
        raise UpdateError(
            f"update from client {client!r} for round {r}: its squared L2 norm overflows "
            f"float32 (norm >= {math.sqrt(OVERFLOW_SQUARE):.3g}); refused whatever the configured bound"
        )
    if limits.max_norm > 0:
        norm = update.delta.l2_norm()
        if norm > limits.max_norm:
            raise UpdateError(
                f"update norm {norm:.6g} exceeds the bound deploy.max_update_norm = {limits.max_norm}"
            )
    if limits.max_weight > 0 and update.weight > limits.max_weight:
        raise UpdateError(
            f"update from client {client!r} for round {r}: weight {update.weight:.6g} exceeds "
            f"deploy.max_weight = {limits.max_weight:g}"
        )
    if limits.uniform and update.weight != 1.0:
        update = dataclasses.replace(update, weight=1.0)
    return update


def one_pass(blob: bytes | memoryview) -> tuple[bool | None, float | None]:
    """The blob's finiteness and sum of squares for :func:`validate_update`, in one pass over
    its data when it can: a sum of squares below :data:`OVERFLOW_SQUARE` has no NaN or infinity in it.
    """
    square = data_square_sum(blob)
    if square is not None and square < OVERFLOW_SQUARE:
        return True, square
    return data_all_finite(blob), square


def cut(text: str) -> str:
    """``text`` cut to :data:`MAX_REASON` characters (what a caller sends is never stored unbounded)."""
    return text if len(text) <= MAX_REASON else f"{text[:MAX_REASON]}... ({len(text)} characters)"


def rejection_reason(exc: BaseException) -> str:
    """The rejection reason for an exception raised while checking one update."""
    if isinstance(exc, FedloomError):
        return str(exc)
    return f"update could not be checked: {type(exc).__name__}: {exc}"
