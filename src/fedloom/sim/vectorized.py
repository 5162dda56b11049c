"""The vectorised executor: local SGD for a block of clients at once with ``torch.func``.

Each block stacks ``K`` copies of the trainable parameters along a new leading
client axis and takes every local step for all of them with one
``vmap(grad_and_value(loss))`` over ``functional_call``. It reproduces
:func:`~fedloom.algorithms.local.local_sgd` client by client:

* clients are sorted by step count and cut into blocks; within a block every
  client's minibatches are padded to the batch size and masked (a padded row
  adds nothing to the loss), and a client that has taken all its steps stops
  updating (its step is masked out with ``where``, so its parameters are left
  exactly as they were);
* minibatch order comes from the same generator (``ctx.rng("local-shuffle")``)
  with the same ``randperm`` draws per pass, and stragglers from the same plan;
* the step is ``torch.optim.SGD``'s rule (momentum, dampening, Nesterov, weight
  decay, ``maximize``), with one momentum buffer per client, stacked;
* per-example losses are averaged over the real rows, so the result equals the
  sequential executor's to float rounding (batched kernels sum in another
  order): within 1e-5 relative, not bit for bit.

The executor knows no algorithm. It asks the algorithm for each client's
:class:`~fedloom.algorithms.plan.LocalPlan` -- the same plan the algorithm's own
``client_update`` runs -- trains the plans' local SGD in blocks, applies their
gradient corrections through each correction's ``stack(block, device)`` (one
correction acting on the block's stacked tensors), and calls each plan's
``finish`` on its client's trained delta. Clients are batched together when their
plans share the start parameters, the :class:`~fedloom.algorithms.local.LocalSGD`
schedule and the kind of correction.

What a block may hold is set by a memory budget (or ``block``). What cannot be
batched runs on the sequential path, announced by one log line on the
``fedloom`` logger: an algorithm without ``local_plan``, a client whose plan is a
reason instead, a correction without ``stack``, a task with its own training
function, a local optimiser other than ``torch.optim.SGD`` or one with a
schedule, a model with buffers or frozen parameters, a loss other than plain
mean cross-entropy, an op ``vmap`` refuses.

On CPU this is rarely faster than the plain loop (stacked weights overflow the
cache); on CUDA it is the main lever, so ``auto`` picks it there.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap

from fedloom.algorithms.api import (
    Algorithm,
    Broadcast,
    ClientContext,
    ClientState,
    ClientUpdate,
    ServerContext,
    Workspace,
)
from fedloom.algorithms.local import (
    GradCorrection,
    LocalOptimizer,
    LocalResult,
    LocalSGD,
    carry_transform_state,
)
from fedloom.algorithms.plan import LocalPlan, PlannedAlgorithm
from fedloom.algorithms.stragglers import dropped_update
from fedloom.core.errors import TrainingError
from fedloom.core.params import Params
from fedloom.data.datasets import ArrayDataset
from fedloom.data.federated import FederatedDataset
from fedloom.sim.executor import Outcome, SequentialExecutor, client_failure, run_client
from fedloom.transforms.pipeline import Pipeline

__all__ = ["SGDRule", "VectorizedExecutor", "sgd_rule", "unsupported_reason"]

log = logging.getLogger("fedloom")

DEFAULT_BUDGET = 256 * 2**20  # bytes of working memory per block
CPU_BLOCK_CAP = 16  # larger blocks only get slower on CPU

# torch.optim.SGD keywords that only choose its implementation, not its update.
_IMPLEMENTATION = frozenset({"foreach", "differentiable", "fused"})


@dataclass(frozen=True)
class SGDRule:
    """``torch.optim.SGD``'s update (its defaults: plain ``w <- w - lr * g``) on stacked tensors."""

    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    maximize: bool = False

    def step(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        buffers: list[torch.Tensor] | None,
        lr: float,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """``(updated params, momentum buffers)``; ``buffers`` is ``None`` before the first step.

        The same operations, in the same order, as ``torch.optim.SGD``'s
        single-tensor step, out of place: ``g <- -g`` if maximising, ``g <- g +
        wd * w``, ``b <- g`` at the first step else ``b <- m * b + (1 - d) * g``,
        ``g <- g + m * b`` (Nesterov) or ``g <- b``, then ``w <- w - lr * g``.
        """
        out: list[torch.Tensor] = []
        new_buffers: list[torch.Tensor] = []
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            if self.maximize:
                g = -g
            if self.weight_decay != 0:
                g = g.add(p, alpha=self.weight_decay)
            if self.momentum != 0:
                if buffers is None:
                    buf = g.clone()
                else:
                    buf = buffers[i].mul(self.momentum).add(g, alpha=1 - self.dampening)
                new_buffers.append(buf)
                g = g.add(buf, alpha=self.momentum) if self.nesterov else buf
            out.append(p.add(g, alpha=-lr))
        return out, (new_buffers if self.momentum != 0 else None)


def sgd_rule(spec: LocalOptimizer | None) -> SGDRule | str:
    """The task's local optimiser as an :class:`SGDRule`, or why it is not one."""
    if spec is None:
        return SGDRule()
    described = f"the task's local optimiser ({spec.name} with {dict(spec.kwargs)})"
    if spec.factory is not torch.optim.SGD:
        return f"{described} is not torch.optim.SGD"
    if spec.schedule is not None:
        return f"{described} has a learning-rate schedule"
    fields = {"momentum", "dampening", "weight_decay", "nesterov", "maximize"}
    unknown = set(spec.kwargs) - fields - _IMPLEMENTATION
    if unknown:
        return f"{described} sets {sorted(unknown)}"
    kw = {k: v for k, v in spec.kwargs.items() if k in fields}
    if any(isinstance(v, torch.Tensor) for v in kw.values()):
        return f"{described} has tensor-valued settings"
    try:
        rule = SGDRule(
            momentum=float(kw.get("momentum", 0.0)),
            dampening=float(kw.get("dampening", 0.0)),
            weight_decay=float(kw.get("weight_decay", 0.0)),
            nesterov=bool(kw.get("nesterov", False)),
            maximize=bool(kw.get("maximize", False)),
        )
    except (TypeError, ValueError) as exc:
        return f"{described} has settings that are not numbers ({exc})"
    if rule.nesterov and (rule.momentum <= 0 or rule.dampening != 0):
        return f"{described} is refused by torch (Nesterov needs momentum and zero dampening)"
    return rule


def unsupported_reason(workspace: Workspace, algorithm: Algorithm) -> str | None:
    """Why no client of this task and algorithm can be batched, or ``None`` if they can."""
    if not isinstance(algorithm, PlannedAlgorithm):
        return f"algorithm {type(algorithm).__name__} declares no local_plan (see fedloom.algorithms.plan)"
    if workspace.train_fn is not None:
        return "the task trains with its own training function"
    if workspace.optimizer is not None and workspace.optimizer.keep_state:
        return "the task keeps its local optimiser's state across rounds"
    rule = sgd_rule(workspace.optimizer)
    if isinstance(rule, str):
        return rule
    module = workspace.module
    if any(True for _ in module.buffers()):
        return "the model has buffers (e.g. batch norm statistics)"
    if set(module.state_dict()) != set(workspace.trainable):
        return "the model has frozen parameters"
    loss = workspace.loss_fn
    if loss is not F.cross_entropy and not (
        type(loss) is torch.nn.CrossEntropyLoss
        and loss.weight is None
        and loss.reduction == "mean"
        and loss.label_smoothing == 0.0
    ):
        return "the loss is not plain mean cross-entropy"
    return None


class _Unbatchable(Exception):
    """A block's plans cannot be trained together (the message says why)."""


@dataclass
class _Member:
    pos: int
    cid: int
    data: ArrayDataset
    plan: LocalPlan


class VectorizedExecutor:
    """Trains blocks of clients at once (see the module docstring).

    ``block`` fixes the clients per block (0: sized to ``budget_bytes``, at most 16
    on CPU); ``device`` is where blocks are trained (results come back to the CPU).
    """

    def __init__(
        self,
        workspace: Workspace,
        data: FederatedDataset,
        pipeline: Pipeline,
        *,
        device: str = "cpu",
        block: int = 0,
        budget_bytes: int = DEFAULT_BUDGET,
    ) -> None:
        if block < 0:
            raise ValueError(f"block must be >= 0 (0 = from the memory budget), got {block}")
        self.workspace = workspace
        self.data = data
        self.pipeline = pipeline
        self.device = torch.device(device)
        self.block = block
        self.budget_bytes = budget_bytes
        self._sequential = SequentialExecutor(workspace, data, pipeline)
        self._round_states: Mapping[int, ClientState] = {}
        self._fallback_logged: set[str] = set()
        self._broken: str | None = None  # set once torch.func refused the model: stay sequential
        # The runner evaluates with workspace.module on the CPU, so a GPU gets its own copy.
        self._module = (
            copy.deepcopy(workspace.module).to(self.device) if self.device.type != "cpu" else workspace.module
        )

    def close(self) -> None:
        """Nothing to release."""

    def block_size(self) -> int:
        """Clients per block: ``block`` if set, else what fits the memory budget."""
        if self.block > 0:
            return self.block
        param_bytes = sum(p.numel() * p.element_size() for p in self.workspace.module.parameters())
        # stacked weights, their gradients, the update and autograd temporaries: ~6 copies per client
        fit = max(1, self.budget_bytes // max(6 * param_bytes, 1))
        return min(fit, CPU_BLOCK_CAP) if self.device.type == "cpu" else fit

    def run_round(
        self,
        algorithm: Algorithm,
        broadcast: Broadcast,
        cohort: Sequence[int],
        client_states: Mapping[int, ClientState],
        ctx: ServerContext,
    ) -> list[Outcome]:
        self._round_states = client_states  # the pipeline's client side reads its kept entries
        reason = self._broken or unsupported_reason(self.workspace, algorithm)
        rule = sgd_rule(self.workspace.optimizer)
        # unsupported_reason names every case of the last two conditions (they narrow the types)
        if reason is not None or isinstance(rule, str) or not isinstance(algorithm, PlannedAlgorithm):
            return self._fall_back(reason or str(rule), algorithm, broadcast, cohort, client_states, ctx)
        results: list[Outcome | None] = [None] * len(cohort)
        # Clients train together when their plans agree on the start, the schedule and the correction kind.
        groups: dict[tuple[int, LocalSGD, type], list[_Member]] = {}
        for pos, raw in enumerate(cohort):
            cid = int(raw)
            cctx = ClientContext(seed=ctx.seed, round=ctx.round, client_id=cid)
            data = self.data.client_data(cid)
            if len(data) == 0:  # the sequential path reports the error value
                results[pos] = self._one(algorithm, broadcast, cid, client_states, ctx)
                continue
            try:
                plan = algorithm.local_plan(self.workspace, broadcast, client_states.get(cid), data, cctx)
            except Exception as exc:  # as run_client: the client's failure, not the round's
                results[pos] = client_failure(cid, ctx.round, exc)
                continue
            if isinstance(plan, str):
                self._log_once(plan)
                results[pos] = self._one(algorithm, broadcast, cid, client_states, ctx)
                continue
            if plan.drop:
                results[pos] = self._finish(dropped_update(cctx, plan.start), ctx)
                continue
            key = (id(plan.start), plan.local, type(plan.correction))
            groups.setdefault(key, []).append(_Member(pos, cid, data, plan))
        size = self.block_size()
        try:
            for members in groups.values():
                members.sort(key=lambda m: (-m.plan.work.steps, m.pos))
                for begin in range(0, len(members), size):
                    for m, outcome in self._train_block(members[begin : begin + size], rule, ctx):
                        results[m.pos] = outcome
        except _Unbatchable as exc:
            return self._fall_back(str(exc), algorithm, broadcast, cohort, client_states, ctx)
        except (RuntimeError, NotImplementedError) as exc:  # an op vmap cannot batch
            self._broken = f"torch.func failed ({type(exc).__name__}: {exc})"
            return self._fall_back(self._broken, algorithm, broadcast, cohort, client_states, ctx)
        except Exception as exc:
            # A block cannot say which of its clients raised: this round runs client by client,
            # where the raising clients fail alone; later rounds are batched again.
            reason = f"a client's code raised {type(exc).__name__} in a batched block: {exc}"
            return self._fall_back(reason, algorithm, broadcast, cohort, client_states, ctx)
        return [r for r in results if r is not None]

    def _one(
        self,
        algorithm: Algorithm,
        broadcast: Broadcast,
        cid: int,
        client_states: Mapping[int, ClientState],
        ctx: ServerContext,
    ) -> Outcome:
        return run_client(
            self.workspace, self.data, self.pipeline, algorithm, broadcast, cid, client_states, ctx
        )

    def _log_once(self, reason: str) -> None:
        if reason not in self._fallback_logged:
            self._fallback_logged.add(reason)
            log.warning("vectorized executor: running clients sequentially: %s", reason)

    def _fall_back(
        self,
        reason: str,
        algorithm: Algorithm,
        broadcast: Broadcast,
        cohort: Sequence[int],
        client_states: Mapping[int, ClientState],
        ctx: ServerContext,
    ) -> list[Outcome]:
        self._log_once(reason)
        return self._sequential.run_round(algorithm, broadcast, cohort, client_states, ctx)

    def _finish(self, update: ClientUpdate, ctx: ServerContext) -> Outcome:
        try:
            update = carry_transform_state(update, self._round_states.get(update.client_id))
            return self.pipeline.client(update, ctx)
        except Exception as exc:  # as run_client: the client's failure, not the round's
            return client_failure(update.client_id, ctx.round, exc)

    def _stacked_correction(self, block: list[_Member]) -> GradCorrection | None:
        """The block's corrections as one acting on stacked tensors (see fedloom.algorithms.plan)."""
        corrections = [m.plan.correction for m in block if m.plan.correction is not None]
        if not corrections:
            return None
        first = corrections[0]
        stack = getattr(first, "stack", None)
        if not callable(stack):
            raise _Unbatchable(f"{first.name} has no stack(block, device) to act on a block of clients")
        stacked = stack(corrections, self.device)
        if isinstance(stacked, str):
            raise _Unbatchable(f"{first.name}: {stacked}")
        return stacked  # type: ignore[no-any-return]

    def _train_block(
        self, block: list[_Member], rule: SGDRule, ctx: ServerContext
    ) -> list[tuple[_Member, Outcome]]:
        dev, names = self.device, self.workspace.trainable
        local, start_params = block[0].plan.local, block[0].plan.start
        correction = self._stacked_correction(block)
        k, bsz = len(block), local.batch_size
        steps = [m.plan.work.steps for m in block]
        t_max = max(steps)
        # Flat data of the block and, per step, each client's row numbers into it (padded, masked).
        offsets = [0]
        for m in block:
            offsets.append(offsets[-1] + len(m.data))
        x_all = torch.cat([m.data.x for m in block]).to(dev)  # (sum n, *features)
        y_all = torch.cat([m.data.y for m in block]).to(dev)  # (sum n,)
        rows = torch.zeros(t_max, k, bsz, dtype=torch.int64)
        mask = torch.zeros(t_max, k, bsz)
        for j, m in enumerate(block):
            for t, idx in enumerate(_batches(len(m.data), local, m.plan.work.steps, m.cid, ctx)):
                rows[t, j, : len(idx)] = idx + offsets[j]
                mask[t, j, : len(idx)] = 1.0
        rows, mask = rows.to(dev), mask.to(dev)
        active = (torch.arange(t_max).unsqueeze(1) < torch.tensor(steps).unsqueeze(0)).to(dev)  # (T, K)

        module = self._module
        module.train()

        def loss_one(
            params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, w: torch.Tensor
        ) -> torch.Tensor:
            logits = functional_call(module, params, (x,))  # (B, classes)
            per_example = F.cross_entropy(logits, y, reduction="none")  # (B,)
            return (per_example * w).sum() / w.sum().clamp(min=1.0)

        step_fn = vmap(grad_and_value(loss_one))
        start = [start_params[n].to(dev) for n in names]
        stacked = [s.unsqueeze(0).repeat(k, *([1] * s.dim())) for s in start]  # (K, *shape) each
        buffers: list[torch.Tensor] | None = None  # (K, *shape) momentum buffers after the first step
        loss_sum = torch.zeros(k, dtype=torch.float64, device=dev)
        for t in range(t_max):
            r = rows[t]  # (K, B)
            grads_d, loss = step_fn(dict(zip(names, stacked, strict=True)), x_all[r], y_all[r], mask[t])
            grads = [grads_d[n] for n in names]
            if correction is not None:
                correction(stacked, grads)  # in place on the fresh gradients, row j by client j's term
            on = active[t]
            moved, buffers = rule.step(stacked, grads, buffers, local.lr)
            stacked = [
                torch.where(on.view(-1, *([1] * (p.dim() - 1))), q, p)
                for p, q in zip(stacked, moved, strict=True)
            ]
            loss_sum += torch.where(on, loss.double(), 0.0)
        out: list[tuple[_Member, Outcome]] = []
        cpu_params = [p.cpu() for p in stacked]
        losses = loss_sum.cpu().tolist()
        for j, m in enumerate(block):
            out.append((m, self._client_result(m, j, names, cpu_params, losses[j], ctx)))
        return out

    def _client_result(
        self,
        m: _Member,
        j: int,
        names: list[str],
        params: list[torch.Tensor],
        loss_sum: float,
        ctx: ServerContext,
    ) -> Outcome:
        steps = m.plan.work.steps
        mean_loss = loss_sum / max(steps, 1)
        if not math.isfinite(mean_loss):
            err = TrainingError(
                f"round {ctx.round}, client {m.cid}: training loss became {mean_loss} "
                f"(learning rate {m.plan.local.lr} may be too high)"
            )
            return client_failure(m.cid, ctx.round, err)
        trained = dict(zip(names, (p[j] for p in params), strict=True))
        start = m.plan.start
        delta = Params({k: trained[k] - v for k, v in start.items()})
        try:
            update = m.plan.finish(LocalResult(delta=delta, num_steps=steps, mean_loss=mean_loss))
        except Exception as exc:  # as run_client: the client's failure, not the round's
            return client_failure(m.cid, ctx.round, exc)
        return self._finish(update, ctx)


def _batches(n: int, local: LocalSGD, total: int, cid: int, ctx: ServerContext) -> list[torch.Tensor]:
    """The minibatch row numbers ``local_sgd`` draws for this client, step by step."""
    gen = ClientContext(seed=ctx.seed, round=ctx.round, client_id=cid).rng("local-shuffle")
    out: list[torch.Tensor] = []
    while len(out) < total:
        order = torch.randperm(n, generator=gen)
        for begin in range(0, n, local.batch_size):
            if len(out) >= total:
                break
            out.append(order[begin : begin + local.batch_size])
    return out
