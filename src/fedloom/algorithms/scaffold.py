"""SCAFFOLD (Karimireddy et al. 2020, arXiv 1910.06378): control variates against client drift.

The server keeps a control variate ``c`` (in ``ServerState.algo_state``), each
client ``i`` its own ``c_i`` (in its :class:`ClientState`, zero before its first
round). One round, for the sampled set ``S`` of ``N`` clients (Algorithm 1):

* client ``i`` starts at ``y_i = x`` and takes ``K_i`` local steps
  ``y_i <- y_i - lr * (g_i(y_i) + c - c_i)``;
* new client control variate,
  Option I:  ``c_i+ = grad f_i(x)`` (one full pass over the local data at ``x``);
  Option II: ``c_i+ = c_i - c + (x - y_i) / (K_i * lr)``;
* the client sends ``delta_y = y_i - x`` and ``delta_c = c_i+ - c_i`` and keeps ``c_i+``;
* the server sets ``x <- x + lr_g * mean_{i in S} delta_y`` (unweighted mean, as in the
  paper; ``lr_g`` is the server optimiser's rate) and
  ``c <- c + (|S| / N) * mean_{i in S} delta_c``, dividing by the population ``N``.

Control variates span every entry of the model's ``state_dict``; entries that are
not trainable (buffers) keep zero control variates. Stragglers run ``K_i`` < full
steps (Option II divides by the steps actually taken); a dropped straggler sends
nothing and keeps its ``c_i``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from fedloom.algorithms.api import (
    Aggregate,
    Broadcast,
    ClientContext,
    ClientState,
    ClientUpdate,
    ServerContext,
    ServerState,
    Workspace,
)
from fedloom.algorithms.fedavg import apply_round, empty_aggregate
from fedloom.algorithms.local import GradCorrection, LocalResult, LocalSGD, load_params
from fedloom.algorithms.plan import LocalPlan, run_plan
from fedloom.algorithms.requirements import UpdateRequirements
from fedloom.algorithms.server_opt import ServerOptimizer, ServerSGD
from fedloom.algorithms.stragglers import Stragglers, accepted, straggler_metrics
from fedloom.core.errors import TrainingError, UpdateError
from fedloom.core.params import Params
from fedloom.data.datasets import ArrayDataset

__all__ = ["Scaffold", "full_gradient"]

CONTROL = "control"
CONTROL_DELTA = "control_delta"


class _ControlCorrection:
    """``g <- g + (c - c_i)``; ``diff`` holds ``c - c_i`` in ``workspace.trainable`` order.

    :meth:`stack` stacks a block's ``diff`` s to ``(K, *shape)``, one row per client.
    """

    name = "SCAFFOLD's control-variate correction"

    def __init__(self, diff: list[torch.Tensor]) -> None:
        self.diff = diff  # on any device: copied to the gradients' device at the first call
        self._moved: list[torch.Tensor] | None = None

    def __call__(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        if self._moved is None:
            self._moved = [d.to(g.device) for d, g in zip(self.diff, grads, strict=True)]
        torch._foreach_add_(grads, self._moved)

    def stack(self, block: Sequence[GradCorrection], device: torch.device) -> GradCorrection | str:
        """One correction for a block of clients' stacked tensors: their ``c - c_i`` stacked."""
        mine = [c for c in block if isinstance(c, _ControlCorrection)]
        if len(mine) != len(block):
            return "a block mixes SCAFFOLD's correction with other corrections"
        return _ControlCorrection(
            [torch.stack(ts).to(device) for ts in zip(*(c.diff for c in mine), strict=True)]
        )


def full_gradient(workspace: Workspace, at: Params, data: ArrayDataset, batch_size: int) -> Params:
    """The gradient of the mean local loss at ``at``, over all of ``data`` in one ordered pass.

    Mean-reduced batch losses are re-weighted by ``len(batch) / n`` so the result is the
    full-data mean gradient whatever ``batch_size`` is. Non-trainable entries are zero.
    """
    n = len(data)
    if n == 0:
        raise TrainingError("cannot compute a gradient on a client with no examples")
    module = workspace.module
    load_params(workspace, at)
    module.train()
    named = dict(module.named_parameters())
    params = [named[name] for name in workspace.trainable]
    for p in params:
        p.grad = None
    for begin in range(0, n, batch_size):
        xb, yb = data.batch(slice(begin, begin + batch_size))
        xb, yb = xb.to(workspace.device), yb.to(workspace.device)
        loss = workspace.loss_fn(module(xb), yb) * (len(yb) / n)
        loss.backward()
    grads = {
        name: p.grad.detach().to("cpu", copy=True)
        if p.grad is not None
        else torch.zeros_like(p, device="cpu")
        for name, p in zip(workspace.trainable, params, strict=True)
    }
    for p in params:
        p.grad = None
    return Params({k: grads[k] if k in grads else torch.zeros_like(v) for k, v in at.items()})


@dataclass(frozen=True)
class Scaffold:
    """SCAFFOLD with ``option`` ``"I"`` or ``"II"``; ``server_optimizer`` applies ``lr_g`` to ``x``."""

    local: LocalSGD = field(default_factory=LocalSGD)
    option: Literal["I", "II"] = "II"
    server_optimizer: ServerOptimizer = field(default_factory=ServerSGD)
    stragglers: Stragglers = field(default_factory=Stragglers)

    def __post_init__(self) -> None:
        if self.option not in ("I", "II"):
            raise ValueError(f"Scaffold.option must be 'I' or 'II', got {self.option!r}")

    @property
    def name(self) -> str:
        return "scaffold"

    def update_requirements(self) -> UpdateRequirements:
        """Every update carries its control-variate delta, shaped like the parameters."""
        return UpdateRequirements(extras=(CONTROL_DELTA,))

    def server_init(self, params: Params) -> ServerState:
        return ServerState(
            round=0,
            params=params,
            opt_state=self.server_optimizer.init(params),
            algo_state={CONTROL: params.zeros_like()},
        )

    def broadcast(self, state: ServerState) -> Broadcast:
        return Broadcast(
            round=state.round + 1, params=state.params, extras={CONTROL: state.algo_state[CONTROL]}
        )

    def local_plan(
        self,
        workspace: Workspace,
        broadcast: Broadcast,
        client_state: ClientState | None,
        data: ArrayDataset,
        ctx: ClientContext,
    ) -> LocalPlan:
        """Local steps corrected by ``c - c_i``; the update carries ``c_i+ - c_i`` and keeps ``c_i+``."""
        x, c = broadcast.params, broadcast.extras[CONTROL]
        c_i = client_state.values[CONTROL] if client_state is not None else x.zeros_like()
        diff = c - c_i
        correction = _ControlCorrection([diff[n] for n in workspace.trainable])
        work = self.stragglers.plan(self.local.num_steps(len(data)), ctx)
        n = len(data)

        def finish(result: LocalResult) -> ClientUpdate:
            if self.option == "I":
                c_new = full_gradient(workspace, x, data, self.local.batch_size)
            else:
                # c_i+ = c_i - c + (x - y_i) / (K lr) = -diff - delta / (K lr), on trainable entries only.
                scale = 1.0 / (result.num_steps * self.local.lr)
                trainable = set(workspace.trainable)
                c_new = Params(
                    {
                        k: -diff[k] - result.delta[k] * scale if k in trainable else torch.zeros_like(v)
                        for k, v in c_i.items()
                    }
                )
            return ClientUpdate(
                client_id=ctx.client_id,
                delta=result.delta,
                weight=1.0,
                num_examples=n,
                num_steps=result.num_steps,
                metrics=straggler_metrics(work, result),
                extras={CONTROL_DELTA: c_new - c_i},
                client_state=ClientState(values={CONTROL: c_new}),
            )

        return LocalPlan(
            start=x,
            local=self.local,
            work=work,
            finish=finish,
            correction=correction,
            drop=work.straggler and self.stragglers.drop,
        )

    def client_update(
        self,
        workspace: Workspace,
        broadcast: Broadcast,
        client_state: ClientState | None,
        data: ArrayDataset,
        ctx: ClientContext,
    ) -> ClientUpdate:
        return run_plan(workspace, self.local_plan(workspace, broadcast, client_state, data, ctx), data, ctx)

    def aggregate(self, updates: Sequence[ClientUpdate], ctx: ServerContext) -> Aggregate:
        kept = accepted(updates)
        if updates and not kept:
            return empty_aggregate(updates)
        if not kept:
            raise UpdateError("cannot aggregate an empty round: no client update was accepted")
        return Aggregate(
            delta=Params.mean([u.delta for u in kept]),
            num_clients=len(kept),
            total_weight=float(len(kept)),
            extras={CONTROL_DELTA: Params.mean([u.extras[CONTROL_DELTA] for u in kept])},
        )

    def server_update(self, state: ServerState, aggregate: Aggregate, ctx: ServerContext) -> ServerState:
        new = apply_round(self.server_optimizer, state, aggregate, ctx)
        if aggregate.num_clients == 0:
            return new
        c = state.algo_state[CONTROL].add_scaled(
            aggregate.extras[CONTROL_DELTA], aggregate.num_clients / ctx.population
        )
        return ServerState(
            round=new.round, params=new.params, opt_state=new.opt_state, algo_state={CONTROL: c}
        )
