"""Local plans: an algorithm's client update, declared once and run by every executor.

Most algorithms' client side has one shape: train locally from the broadcast
(perhaps with a gradient correction, perhaps cut short for a straggler), then
build the update from the result. Such an algorithm declares it with

``local_plan(workspace, broadcast, client_state, data, ctx) -> LocalPlan | str``

and its ``client_update`` is :func:`run_plan` of that plan, so there is one
definition of the client side per algorithm. An executor that trains many
clients at once (the vectorised one) asks for the same plans, trains them
together and calls each plan's ``finish`` on its client's :class:`LocalResult`;
it never needs to know which algorithm it runs. A plan says:

``start``
    the parameters training starts from (the broadcast's);
``local``
    the :class:`LocalSGD` schedule (learning rate, batch size, epochs or steps);
``work``
    the client's :class:`StragglerPlan` (how many steps it takes this round);
``drop``
    whether that work is discarded (a dropped straggler answers
    :func:`~fedloom.algorithms.stragglers.dropped_update` without training);
``correction``
    the :class:`GradCorrection` added to every local gradient, or ``None``;
``finish``
    ``finish(result) -> ClientUpdate``: the update from the trained delta, the
    steps taken and the mean loss (weights, extras, the client's new state).

A string instead of a plan says why this client's update is not such a plan;
executors then call ``client_update`` for it (and log the reason once).

**Corrections on a block of clients.** A correction acts on lists of tensors in
place, ``correction(params, grads)``, with no assumption on their leading
shape. A :class:`StackableCorrection` also has ``stack(block, device)``, which
combines the corrections of ``K`` clients (one per client, in block order) into
one correction of the same kind holding its tensors stacked along a new leading
client axis, so that the same ``__call__`` applies every client's term to the
stacked ``(K, *shape)`` parameters and gradients: FedProx's anchor broadcast as
``(1, *shape)``, SCAFFOLD's ``c - c_i`` stacked to ``(K, *shape)``. A correction
without ``stack`` (or whose ``stack`` returns a reason) is run client by client.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from fedloom.algorithms.api import Broadcast, ClientContext, ClientState, ClientUpdate, Workspace
from fedloom.algorithms.local import GradCorrection, LocalResult, LocalSGD, local_sgd
from fedloom.algorithms.stragglers import StragglerPlan, dropped_update
from fedloom.core.params import Params
from fedloom.data.datasets import ArrayDataset

__all__ = ["LocalPlan", "PlannedAlgorithm", "StackableCorrection", "run_plan"]


@dataclass(frozen=True)
class LocalPlan:
    """One client's local work for a round and how its update is built (see the module docstring)."""

    start: Params
    local: LocalSGD
    work: StragglerPlan
    finish: Callable[[LocalResult], ClientUpdate]
    correction: GradCorrection | None = None
    drop: bool = False


@runtime_checkable
class PlannedAlgorithm(Protocol):
    """An algorithm whose client update is a :class:`LocalPlan` (batched by the vectorised executor)."""

    def local_plan(
        self,
        workspace: Workspace,
        broadcast: Broadcast,
        client_state: ClientState | None,
        data: ArrayDataset,
        ctx: ClientContext,
    ) -> LocalPlan | str: ...


@runtime_checkable
class StackableCorrection(Protocol):
    """A :class:`GradCorrection` that can act on a block of clients' stacked tensors.

    ``stack(block, device)`` receives the block's corrections (this one's kind,
    one per client, in block order) and returns one correction, with its tensors
    on ``device``, whose ``__call__`` applies client ``j``'s term to row ``j``
    of stacked ``(K, *shape)`` parameters and gradients; or a string saying why
    this block cannot be stacked. It must not modify the corrections it is given.
    """

    name: str

    def __call__(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None: ...

    def stack(self, block: Sequence[GradCorrection], device: torch.device) -> GradCorrection | str: ...


def run_plan(workspace: Workspace, plan: LocalPlan, data: ArrayDataset, ctx: ClientContext) -> ClientUpdate:
    """The plan run on one client with fedloom's loop (or the task's training function)."""
    if plan.drop:
        return dropped_update(ctx, plan.start)
    result = local_sgd(
        workspace, plan.start, data, plan.local, ctx, correction=plan.correction, max_steps=plan.work.steps
    )
    return plan.finish(result)
