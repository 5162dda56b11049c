"""The vectorised executor: local SGD for a block of clients at once with ``torch.func``.

Each block stacks ``K`` copies of the trainable parameters along a new leading
client axis and takes every SGD step for all of them with one
``vmap(grad_and_value(loss))`` over ``functional_call``. It reproduces
:func:`~fedloom.algorithms.local.local_sgd` client by client:

* clients are sorted by step count and cut into blocks; within a block every
  client's minibatches are padded to the batch size and masked (a padded row
  adds nothing to the loss), and a client that has taken all its steps stops
  updating (its step is masked out with ``where``, so its parameters are left
  exactly as they were);
* minibatch order comes from the same generator (``ctx.rng("local-shuffle")``)
  with the same ``randperm`` draws per pass, and stragglers from the same plan;
* per-example losses are averaged over the real rows, so the result equals the
  sequential executor's to float rounding (batched kernels sum in another
  order): within 1e-5 relative, not bit for bit.

What a block may hold is set by a memory budget (or ``block``). Algorithms are
supported through a registry of *vectorisers* keyed by the algorithm's type:
FedAvg, FedNova (whose client side is FedAvg's), FedProx and SCAFFOLD (option II)
are registered here. A vectoriser supplies the local-SGD settings, an optional
:class:`BatchedCorrection` -- the tensor-op form of a
:class:`~fedloom.algorithms.local.GradCorrection`: FedProx's ``mu (w - w_t)``, or
SCAFFOLD's ``c - c_i`` stacked per client of the block -- and an optional ``finish``
that builds the algorithm's update from the trained delta (SCAFFOLD's new control
variate ``c_i+``, its delta and the client state). Anything else -- SCAFFOLD's
option I (a full-gradient pass per client),
another algorithm, a model with buffers or frozen parameters, a loss other than
plain cross-entropy, an op ``vmap`` refuses -- runs on the sequential path,
announced by one log line on the ``fedloom`` logger.

On CPU this is rarely faster than the plain loop (issue 4: stacked weights
overflow the cache); on CUDA it is the main lever, so ``auto`` picks it there.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap

from fedloom.algorithms.aggregate import Weighting, client_weight
from fedloom.algorithms.api import (
    Algorithm,
    Broadcast,
    ClientContext,
    ClientState,
    ClientUpdate,
    ServerContext,
    Workspace,
)
from fedloom.algorithms.fedavg import FedAvg
from fedloom.algorithms.fednova import FedNova
from fedloom.algorithms.fedprox import FedProx
from fedloom.algorithms.local import LocalSGD
from fedloom.algorithms.scaffold import CONTROL, CONTROL_DELTA, Scaffold
from fedloom.algorithms.stragglers import StragglerPlan, Stragglers, dropped_update
from fedloom.core.errors import TrainingError
from fedloom.core.params import Params
from fedloom.data.datasets import ArrayDataset
from fedloom.data.federated import FederatedDataset
from fedloom.sim.executor import ClientFailure, Outcome, SequentialExecutor, client_failure, run_client
from fedloom.transforms.pipeline import Pipeline

__all__ = [
    "BatchedCorrection",
    "VectorPlan",
    "VectorizedExecutor",
    "register_vectorizer",
    "vectorizer_for",
]

log = logging.getLogger("fedloom")

DEFAULT_BUDGET = 256 * 2**20  # bytes of working memory per block
CPU_BLOCK_CAP = 16  # issue 4: larger blocks only get slower on CPU


class BatchedCorrection(Protocol):
    """An algorithm's gradient term for a block: returns corrected ``grads``.

    ``params`` and ``grads`` are the stacked trainable tensors, shape
    ``(K, *param_shape)`` in ``workspace.trainable`` order; ``clients`` are the
    block's client ids (to look up per-client tensors). Must not modify its inputs.
    """

    def __call__(
        self, params: list[torch.Tensor], grads: list[torch.Tensor], clients: Sequence[int]
    ) -> list[torch.Tensor]: ...


@dataclass(frozen=True)
class VectorPlan:
    """How to run an algorithm's client update in a block.

    ``local`` and ``stragglers`` drive the batched local SGD, ``correction`` adds the
    algorithm's gradient term, and ``finish`` turns the plain local-SGD result (a
    FedAvg-shaped update: delta, ``weight = n``, train loss) into the algorithm's
    own update (weights, extras, client state), exactly as its ``client_update`` does.
    """

    local: LocalSGD
    stragglers: Stragglers
    correction: BatchedCorrection | None = None
    finish: Callable[[ClientUpdate], ClientUpdate] | None = None


#: ``(algorithm, broadcast, workspace, the cohort's stored client states, device) -> plan``
Vectorizer = Callable[[Algorithm, Broadcast, Workspace, Mapping[int, ClientState], torch.device], VectorPlan]
_VECTORIZERS: dict[type, tuple[Vectorizer, Callable[[Algorithm], str | None] | None]] = {}


def register_vectorizer(
    algorithm_type: type, fn: Vectorizer, *, refuses: Callable[[Algorithm], str | None] | None = None
) -> None:
    """Make ``algorithm_type`` vectorisable; refuses a second registration for the same type.

    ``refuses(algorithm)``, if given, names a configuration of the type that cannot be
    vectorised (it then runs sequentially), or returns ``None``.
    """
    if algorithm_type in _VECTORIZERS:
        raise ValueError(f"a vectoriser for {algorithm_type.__name__} is already registered")
    _VECTORIZERS[algorithm_type] = (fn, refuses)


def vectorizer_for(algorithm: Algorithm) -> Vectorizer | None:
    entry = _VECTORIZERS.get(type(algorithm))
    if entry is None or (entry[1] is not None and entry[1](algorithm) is not None):
        return None
    return entry[0]


class _Proximal:
    """FedProx's ``g + mu (w - w_t)`` on stacked tensors (``anchor`` broadcasts over the client axis)."""

    def __init__(self, mu: float, anchor: list[torch.Tensor]) -> None:
        self.mu = mu
        self.anchor = anchor

    def __call__(
        self, params: list[torch.Tensor], grads: list[torch.Tensor], clients: Sequence[int]
    ) -> list[torch.Tensor]:
        return [g.add(p - a, alpha=self.mu) for p, g, a in zip(params, grads, self.anchor, strict=True)]


class _Control:
    """SCAFFOLD's ``g + (c - c_i)`` on stacked tensors: ``c - c_i`` stacked per block's clients."""

    def __init__(self, diffs: Mapping[int, list[torch.Tensor]]) -> None:
        self.diffs = diffs
        self._stacked: tuple[tuple[int, ...], list[torch.Tensor]] = ((), [])

    def __call__(
        self, params: list[torch.Tensor], grads: list[torch.Tensor], clients: Sequence[int]
    ) -> list[torch.Tensor]:
        key = tuple(clients)
        if self._stacked[0] != key:  # once per block, not per step
            per_client = [self.diffs[c] for c in clients]
            self._stacked = (key, [torch.stack(ts) for ts in zip(*per_client, strict=True)])
        return [g + d for g, d in zip(grads, self._stacked[1], strict=True)]


def _fedavg_plan(
    alg: Algorithm, bc: Broadcast, ws: Workspace, states: Mapping[int, ClientState], device: torch.device
) -> VectorPlan:
    # FedNova trains exactly as FedAvg does (its step-normalisation is in aggregate).
    assert isinstance(alg, FedAvg | FedNova)
    return VectorPlan(alg.local, alg.stragglers, finish=_reweight(alg.weighting))


def _fedprox_plan(
    alg: Algorithm, bc: Broadcast, ws: Workspace, states: Mapping[int, ClientState], device: torch.device
) -> VectorPlan:
    assert isinstance(alg, FedProx)
    corr = None
    if alg.mu > 0:
        corr = _Proximal(alg.mu, [bc.params[n].to(device) for n in ws.trainable])
    return VectorPlan(alg.local, alg.stragglers, corr, _reweight(alg.weighting))


def _reweight(weighting: Weighting) -> Callable[[ClientUpdate], ClientUpdate] | None:
    """As the algorithms' ``client_update``: the weight ``n`` becomes the configured weighting's."""
    if weighting == "examples":
        return None
    return lambda u: replace(u, weight=client_weight(weighting, u.num_examples))


def _scaffold_plan(
    alg: Algorithm, bc: Broadcast, ws: Workspace, states: Mapping[int, ClientState], device: torch.device
) -> VectorPlan:
    """SCAFFOLD option II: the per-client correction stacked per block, then the paper's ``c_i+``."""
    assert isinstance(alg, Scaffold)
    x, c = bc.params, bc.extras[CONTROL]

    def c_i(cid: int) -> Params:
        st = states.get(cid)
        return st.values[CONTROL] if st is not None else x.zeros_like()

    class _Diffs(dict[int, list[torch.Tensor]]):
        def __missing__(self, cid: int) -> list[torch.Tensor]:
            diff = c - c_i(cid)
            self[cid] = [diff[n].to(device) for n in ws.trainable]
            return self[cid]

    def finish(u: ClientUpdate) -> ClientUpdate:
        # As Scaffold.client_update: c_i+ = -(c - c_i) - delta / (K lr); weight 1 (unweighted mean).
        old = c_i(u.client_id)
        diff = c - old
        scale = 1.0 / (u.num_steps * alg.local.lr)
        c_new = Params({k: -diff[k] - u.delta[k] * scale for k in old})
        return replace(
            u,
            weight=1.0,
            extras={CONTROL_DELTA: c_new - old},
            client_state=ClientState(values={CONTROL: c_new}),
        )

    return VectorPlan(alg.local, alg.stragglers, _Control(_Diffs()), finish)


def _scaffold_refuses(alg: Algorithm) -> str | None:
    assert isinstance(alg, Scaffold)
    if alg.option != "II":
        return "SCAFFOLD option I needs a full-gradient pass per client"
    return None


register_vectorizer(FedAvg, _fedavg_plan)
register_vectorizer(FedNova, _fedavg_plan)
register_vectorizer(FedProx, _fedprox_plan)
register_vectorizer(Scaffold, _scaffold_plan, refuses=_scaffold_refuses)


def unsupported_reason(workspace: Workspace, algorithm: Algorithm) -> str | None:
    """Why this model/algorithm cannot be vectorised, or ``None`` if it can."""
    entry = _VECTORIZERS.get(type(algorithm))
    if entry is None:
        return f"no vectoriser is registered for algorithm {type(algorithm).__name__}"
    refusal = entry[1](algorithm) if entry[1] is not None else None
    if refusal is not None:
        return refusal
    if workspace.train_fn is not None:
        return "the task trains with its own training function"
    if workspace.optimizer is not None and workspace.optimizer.keep_state:
        return "the task keeps its local optimiser's state across rounds"
    if workspace.optimizer is not None and not workspace.optimizer.is_plain_sgd():
        return f"the task's local optimiser ({workspace.optimizer.name} with {dict(workspace.optimizer.kwargs)}) is not plain SGD"
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


@dataclass
class _Member:
    pos: int
    cid: int
    data: ArrayDataset
    plan: StragglerPlan


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
        reason = self._broken or unsupported_reason(self.workspace, algorithm)
        if reason is not None:
            return self._fall_back(reason, algorithm, broadcast, cohort, client_states, ctx)
        vectorizer = vectorizer_for(algorithm)
        assert vectorizer is not None
        plan = vectorizer(algorithm, broadcast, self.workspace, client_states, self.device)
        results: list[Outcome | None] = [None] * len(cohort)
        members: list[_Member] = []
        for pos, raw in enumerate(cohort):
            cid = int(raw)
            cctx = ClientContext(seed=ctx.seed, round=ctx.round, client_id=cid)
            data = self.data.client_data(cid)
            if len(data) == 0:  # the sequential path reports the error value
                results[pos] = run_client(
                    self.workspace, self.data, self.pipeline, algorithm, broadcast, cid, client_states, ctx
                )
                continue
            splan = plan.stragglers.plan(plan.local.num_steps(len(data)), cctx)
            if splan.straggler and plan.stragglers.drop:
                results[pos] = self._finish(dropped_update(cctx, broadcast.params), ctx)
                continue
            members.append(_Member(pos, cid, data, splan))
        members.sort(key=lambda m: (-m.plan.steps, m.pos))
        size = self.block_size()
        try:
            for begin in range(0, len(members), size):
                for m, outcome in self._train_block(members[begin : begin + size], plan, broadcast, ctx):
                    results[m.pos] = outcome
        except (RuntimeError, NotImplementedError) as exc:  # an op vmap cannot batch
            self._broken = f"torch.func failed ({type(exc).__name__}: {exc})"
            return self._fall_back(self._broken, algorithm, broadcast, cohort, client_states, ctx)
        except Exception as exc:
            # A block cannot say which of its clients raised: this round runs client by client,
            # where the raising clients fail alone; later rounds are batched again.
            reason = f"a client's code raised {type(exc).__name__} in a batched block: {exc}"
            return self._fall_back(reason, algorithm, broadcast, cohort, client_states, ctx)
        return [r for r in results if r is not None]

    def _fall_back(
        self,
        reason: str,
        algorithm: Algorithm,
        broadcast: Broadcast,
        cohort: Sequence[int],
        client_states: Mapping[int, ClientState],
        ctx: ServerContext,
    ) -> list[Outcome]:
        if reason not in self._fallback_logged:
            self._fallback_logged.add(reason)
            log.warning("vectorized executor: running clients sequentially: %s", reason)
        return self._sequential.run_round(algorithm, broadcast, cohort, client_states, ctx)

    def _finish(self, update: ClientUpdate, ctx: ServerContext) -> Outcome:
        try:
            return self.pipeline.client(update, ctx)
        except Exception as exc:  # as run_client: the client's failure, not the round's
            return client_failure(update.client_id, ctx.round, exc)

    def _train_block(
        self, block: list[_Member], plan: VectorPlan, broadcast: Broadcast, ctx: ServerContext
    ) -> list[tuple[_Member, Outcome]]:
        dev, local, names = self.device, plan.local, self.workspace.trainable
        k, bsz = len(block), local.batch_size
        steps = [m.plan.steps for m in block]
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
            for t, idx in enumerate(_batches(len(m.data), local, m.plan.steps, m.cid, ctx)):
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
        start = [broadcast.params[n].to(dev) for n in names]
        stacked = [s.unsqueeze(0).repeat(k, *([1] * s.dim())) for s in start]  # (K, *shape) each
        loss_sum = torch.zeros(k, dtype=torch.float64, device=dev)
        clients = [m.cid for m in block]
        for t in range(t_max):
            r = rows[t]  # (K, B)
            grads_d, loss = step_fn(dict(zip(names, stacked, strict=True)), x_all[r], y_all[r], mask[t])
            grads = [grads_d[n] for n in names]
            if plan.correction is not None:
                grads = plan.correction(stacked, grads, clients)
            on = active[t]
            stacked = [
                torch.where(on.view(-1, *([1] * (p.dim() - 1))), p.add(g, alpha=-local.lr), p)
                for p, g in zip(stacked, grads, strict=True)
            ]
            loss_sum += torch.where(on, loss.double(), 0.0)
        out: list[tuple[_Member, Outcome]] = []
        cpu_params = [p.cpu() for p in stacked]
        losses = loss_sum.cpu().tolist()
        for j, m in enumerate(block):
            out.append((m, self._client_result(m, j, names, cpu_params, losses[j], broadcast, plan, ctx)))
        return out

    def _client_result(
        self,
        m: _Member,
        j: int,
        names: list[str],
        params: list[torch.Tensor],
        loss_sum: float,
        broadcast: Broadcast,
        plan: VectorPlan,
        ctx: ServerContext,
    ) -> Outcome:
        n, steps = len(m.data), m.plan.steps
        mean_loss = loss_sum / max(steps, 1)
        if not math.isfinite(mean_loss):
            err = TrainingError(
                f"round {ctx.round}, client {m.cid}: training loss became {mean_loss} "
                "(the learning rate may be too high)"
            )
            return ClientFailure(m.cid, str(err), diverged=True)
        trained = dict(zip(names, (p[j] for p in params), strict=True))
        delta = Params({k: trained[k] - v for k, v in broadcast.params.items()})
        metrics = {"train_loss": mean_loss}
        if m.plan.straggler:
            metrics["straggler"] = 1.0
        update = ClientUpdate(
            client_id=m.cid, delta=delta, weight=float(n), num_examples=n, num_steps=steps, metrics=metrics
        )
        if plan.finish is not None:
            update = plan.finish(update)
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
