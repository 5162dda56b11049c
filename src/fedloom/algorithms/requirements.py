"""What an algorithm's client updates must carry, checked before an update may count.

An algorithm declares :class:`UpdateRequirements` with a method
``update_requirements() -> UpdateRequirements``: the extras every update carries
(each shaped exactly like the global parameters, e.g. SCAFFOLD's control-variate
delta) and the fewest local steps an update may report (FedNova divides by it).
:func:`check_update` holds one decoded update against them; a runtime that receives
updates from outside (the deployed server, on upload and when it restores accepted
updates after a restart) calls it so that a malformed update is rejected with a
reason instead of breaking the round's aggregation.

An algorithm that declares nothing gets :data:`UNDECLARED`: any extras and any
step count pass (only their values are checked, by the runtime). Updates of
dropped stragglers (see :func:`~fedloom.algorithms.stragglers.accepted`) take no
part in aggregation, and are held to no requirement.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fedloom.algorithms.api import ClientUpdate
from fedloom.algorithms.stragglers import DROPPED
from fedloom.core.errors import UpdateError
from fedloom.core.params import Params

__all__ = ["UNDECLARED", "UpdateRequirements", "check_update", "requirements_of"]


@dataclass(frozen=True)
class UpdateRequirements:
    """``extras``: the names of the extras every update carries, no more and no fewer, each with the
    global parameters' names, shapes and dtypes (``None``: not declared, anything goes);
    ``min_steps``: the fewest local steps an update may report."""

    extras: tuple[str, ...] | None = ()
    min_steps: int = 0


UNDECLARED = UpdateRequirements(extras=None, min_steps=0)


def requirements_of(algorithm: object) -> UpdateRequirements:
    """``algorithm.update_requirements()``, or :data:`UNDECLARED` for an algorithm without it."""
    declare = getattr(algorithm, "update_requirements", None)
    if not callable(declare):
        return UNDECLARED
    req = declare()
    if not isinstance(req, UpdateRequirements):
        raise TypeError(f"{type(algorithm).__name__}.update_requirements() must return UpdateRequirements")
    return req


def check_update(
    req: UpdateRequirements, update: ClientUpdate, params: Params, *, client: str, round: int
) -> None:
    """Raise :class:`UpdateError` naming ``client``, ``round`` and the field unless ``update`` meets ``req``.

    ``params`` are the global parameters the update was trained on (names, shapes, dtypes).
    """
    if update.metrics.get(DROPPED, 0.0) != 0.0:
        return
    where = f"update from client {client!r} for round {round}"
    if update.num_steps < req.min_steps:
        raise UpdateError(
            f"{where}: num_steps = {update.num_steps}, the algorithm needs at least {req.min_steps}"
        )
    if req.extras is None:
        return
    _check_extras(req.extras, update.extras, params, where)


def _check_extras(names: tuple[str, ...], extras: Mapping[str, Params], params: Params, where: str) -> None:
    missing = sorted(set(names) - set(extras))
    unexpected = sorted(set(extras) - set(names))
    if missing or unexpected:
        raise UpdateError(
            f"{where}: extras {sorted(extras)}, the algorithm needs exactly {sorted(names)} "
            f"(missing {missing}, unexpected {unexpected})"
        )
    for name in names:
        params.check_compatible(extras[name], what=f"{where}: extra {name!r}")
