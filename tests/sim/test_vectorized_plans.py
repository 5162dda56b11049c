"""The vectorised executor runs algorithms' declared local plans, not a list of known algorithms.

Each batched run is held to the sequential executor round by round (the change of
the global model per round, to float rounding) and must not announce a fallback.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import torch
from tests.sim.conftest import mnist_config

from fedloom.algorithms.aggregate import client_weight
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
from fedloom.algorithms.fedavg import FedAvg, apply_round, weighted_round
from fedloom.algorithms.local import GradCorrection, LocalOptimizer, LocalResult, LocalSGD
from fedloom.algorithms.plan import LocalPlan, run_plan
from fedloom.algorithms.server_opt import ServerSGD
from fedloom.algorithms.stragglers import Stragglers, straggler_metrics
from fedloom.config.schema import ExperimentConfig
from fedloom.core.params import Params
from fedloom.data.datasets import ArrayDataset
from fedloom.results.store import RunStore
from fedloom.sim.build import Components, build_components, task_for
from fedloom.sim.executor import SequentialExecutor
from fedloom.sim.runner import STATE_DB, RunResult, run_simulation
from fedloom.sim.vectorized import SGDRule, VectorizedExecutor, sgd_rule

DELTA_ATOL = 1e-7  # per coordinate of a round's model change, as in test_executor_conformance


def _round_deltas(run_dir: Path, initial: Params) -> list[Params]:
    with RunStore(run_dir / STATE_DB) as store:
        models = [initial] + [store.load_state(r).params for r in range(1, store.latest_round() + 1)]
    return [b - a for a, b in itertools.pairwise(models)]


def _both(
    cfg: ExperimentConfig, comps: Components, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> tuple[RunResult, RunResult]:
    """The sequential reference and the vectorised run (blocks of 3), asserting nothing fell back."""
    seq = SequentialExecutor(comps.workspace, comps.train, comps.pipeline, threads=1)
    want = run_simulation(cfg, tmp_path / "seq", components=comps, executor=seq)
    ex = VectorizedExecutor(comps.workspace, comps.train, comps.pipeline, block=3)
    with caplog.at_level(logging.WARNING, logger="fedloom"):
        got = run_simulation(cfg, tmp_path / "vec", components=comps, executor=ex)
    assert not [r.getMessage() for r in caplog.records if "sequentially" in r.getMessage()]
    return want, got


def _assert_rounds_match(want: RunResult, got: RunResult, initial: Params, rounds: int) -> None:
    expected = _round_deltas(want.run_dir, initial)
    deltas = _round_deltas(got.run_dir, initial)
    assert len(deltas) == len(expected) == rounds
    for r, (d, w) in enumerate(zip(deltas, expected, strict=True), start=1):
        assert w.l2_norm() > 0, r
        for k in w:
            err = float((d[k] - w[k]).abs().max())
            assert err <= DELTA_ATOL, (r, k, err)
    for name, value in want.state.algo_state.items():
        assert got.state.algo_state[name].allclose(value, rtol=1e-4, atol=1e-6), name


# --- SGD with momentum -----------------------------------------------------------------------------

SETTINGS = [
    {"momentum": 0.9},
    {"momentum": 0.9, "weight_decay": 1e-3, "nesterov": True},
    {"momentum": 0.5, "dampening": 0.3, "weight_decay": 1e-2},
    {"weight_decay": 1e-2},
    {"momentum": 0.9, "maximize": True},
]


@pytest.mark.parametrize("kwargs", SETTINGS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_sgd_rule_is_torch_sgd_on_every_row_of_a_stack(kwargs: dict[str, float]) -> None:
    """Four steps of the stacked rule equal torch.optim.SGD run on each client's row alone."""
    gen = torch.Generator().manual_seed(0)
    k, shape, lr = 3, (4, 5), 0.1
    start = torch.randn(k, *shape, generator=gen)
    grads = [torch.randn(k, *shape, generator=gen) for _ in range(4)]
    rule = sgd_rule(LocalOptimizer(kwargs=kwargs))
    assert isinstance(rule, SGDRule)
    stacked, buffers = [start.clone()], None
    for g in grads:
        stacked, buffers = rule.step(stacked, [g], buffers, lr)
    for j in range(k):
        w = torch.nn.Parameter(start[j].clone())
        opt = torch.optim.SGD([w], lr=lr, **kwargs)
        for g in grads:
            w.grad = g[j].clone()
            opt.step()
        assert torch.equal(stacked[0][j], w.detach()), j


def test_sgd_rule_refuses_what_it_does_not_reproduce() -> None:
    assert "not torch.optim.SGD" in str(sgd_rule(LocalOptimizer(torch.optim.Adam)))
    sched = LocalOptimizer(schedule=lambda opt, n: torch.optim.lr_scheduler.StepLR(opt, 1))
    assert "schedule" in str(sgd_rule(sched))
    assert "Nesterov" in str(sgd_rule(LocalOptimizer(kwargs={"nesterov": True})))
    assert sgd_rule(None) == SGDRule() == sgd_rule(LocalOptimizer(kwargs={"foreach": False}))


MOMENTUM = {"momentum": 0.9, "weight_decay": 1e-3}


@pytest.mark.parametrize(
    ("sets", "kwargs"),
    [
        (("algorithm.name=fedavg",), MOMENTUM),
        (("algorithm.name=fedprox", "algorithm.mu=0.1", "algorithm.straggler_fraction=0.5"), MOMENTUM),
        (("algorithm.name=fedavg",), {"momentum": 0.5, "dampening": 0.1, "nesterov": False}),
        (("algorithm.name=scaffold", "algorithm.scaffold_option=I"), {"momentum": 0.9, "nesterov": True}),
    ],
    ids=["fedavg", "fedprox-stragglers", "fedavg-dampening", "scaffold-I-nesterov"],
)
def test_momentum_vectorizes_round_by_round(
    sets: tuple[str, ...],
    kwargs: dict[str, float],
    mnist_dir: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = mnist_config(mnist_dir, *sets, "data.num_clients=12", "sampling.fraction=0.5", "client.lr=0.02")
    comps = build_components(cfg, task=replace(task_for(cfg), optimizer=LocalOptimizer(kwargs=kwargs)))
    want, got = _both(cfg, comps, tmp_path, caplog)
    _assert_rounds_match(want, got, comps.initial_params, cfg.rounds)


def test_scaffold_option_ii_with_momentum_vectorizes_round_by_round(
    mnist_dir: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Executor conformance whatever the update rule's assumptions: the experiment-file check that
    refuses option II with a non-plain optimiser is bypassed by setting the workspace's optimiser.
    Momentum 0.5: with 0.9 option II's control variates (which ignore momentum) blow up by round 3,
    and the float rounding of any two kernels grows with them."""
    cfg = mnist_config(
        mnist_dir, "algorithm.name=scaffold", "data.num_clients=8", "sampling.fraction=0.5", "client.lr=0.02"
    )
    comps = build_components(cfg)
    comps.workspace.optimizer = LocalOptimizer(kwargs={"momentum": 0.5, "weight_decay": 1e-3})
    want, got = _both(cfg, comps, tmp_path, caplog)
    _assert_rounds_match(want, got, comps.initial_params, cfg.rounds)
    with RunStore(want.run_dir / STATE_DB) as a, RunStore(got.run_dir / STATE_DB) as b:
        want_states, got_states = a.client_states(), b.client_states()
    assert want_states
    assert sorted(got_states) == sorted(want_states)
    for cid, st in want_states.items():
        assert got_states[cid].values["control"].allclose(st.values["control"], rtol=1e-4, atol=1e-6), cid


# --- an algorithm fedloom does not know -----------------------------------------------------------


class _Shrink:
    """``g <- g + lam_k * w`` with a per-client ``lam_k``: stacked as a ``(K, 1, ...)`` column."""

    name = "shrinkage"

    def __init__(self, lam: torch.Tensor) -> None:
        self.lam = lam  # () for one client, (K,) for a block

    def __call__(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        for p, g in zip(params, grads, strict=True):
            lam = self.lam.view(-1, *([1] * (p.dim() - 1))) if self.lam.dim() else self.lam
            g.add_(lam * p)

    def stack(self, block: Sequence[GradCorrection], device: torch.device) -> GradCorrection | str:
        lams = [c.lam for c in block if isinstance(c, _Shrink)]
        if len(lams) != len(block):
            return "mixed corrections"
        return _Shrink(torch.stack(lams).to(device))


@dataclass(frozen=True)
class ShrinkAvg:
    """A user's algorithm: FedAvg whose client ``k`` shrinks its weights by ``0.05 * (k % 3)``."""

    local: LocalSGD = field(default_factory=lambda: LocalSGD(lr=0.05, batch_size=20))

    @property
    def name(self) -> str:
        return "shrinkavg"

    def server_init(self, params: Params) -> ServerState:
        return ServerState(round=0, params=params)

    def broadcast(self, state: ServerState) -> Broadcast:
        return Broadcast(round=state.round + 1, params=state.params)

    def local_plan(
        self,
        workspace: Workspace,
        broadcast: Broadcast,
        client_state: ClientState | None,
        data: ArrayDataset,
        ctx: ClientContext,
    ) -> LocalPlan:
        work = Stragglers().plan(self.local.num_steps(len(data)), ctx)

        def finish(result: LocalResult) -> ClientUpdate:
            return ClientUpdate(
                client_id=ctx.client_id,
                delta=result.delta,
                weight=client_weight("examples", len(data)),
                num_examples=len(data),
                num_steps=result.num_steps,
                metrics=straggler_metrics(work, result),
            )

        lam = torch.tensor(0.05 * (ctx.client_id % 3))
        return LocalPlan(broadcast.params, self.local, work, finish, correction=_Shrink(lam))

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
        return weighted_round(updates)

    def server_update(self, state: ServerState, aggregate: Aggregate, ctx: ServerContext) -> ServerState:
        return apply_round(ServerSGD(), state, aggregate, ctx)


def test_a_users_algorithm_with_a_local_plan_is_vectorized(
    mnist_dir: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = mnist_config(mnist_dir, "data.num_clients=12", "sampling.fraction=0.5")
    base = build_components(cfg)
    comps = replace(base, algorithm=ShrinkAvg())
    want, got = _both(cfg, comps, tmp_path, caplog)
    _assert_rounds_match(want, got, comps.initial_params, cfg.rounds)
    # The per-client term took effect: the same run without it (FedAvg) ends elsewhere.
    plain = replace(base, algorithm=FedAvg(local=ShrinkAvg().local))
    seq = SequentialExecutor(plain.workspace, plain.train, plain.pipeline)
    fedavg = run_simulation(cfg, tmp_path / "plain", components=plain, executor=seq).state.params
    assert not fedavg.allclose(want.state.params, rtol=1e-3, atol=1e-4)


@dataclass(frozen=True)
class Unplanned:
    """A user's algorithm without a local plan: FedAvg's functions, delegated."""

    inner: FedAvg = field(default_factory=FedAvg)

    @property
    def name(self) -> str:
        return "unplanned"

    def server_init(self, params: Params) -> ServerState:
        return self.inner.server_init(params)

    def broadcast(self, state: ServerState) -> Broadcast:
        return self.inner.broadcast(state)

    def client_update(
        self,
        workspace: Workspace,
        broadcast: Broadcast,
        client_state: ClientState | None,
        data: ArrayDataset,
        ctx: ClientContext,
    ) -> ClientUpdate:
        return self.inner.client_update(workspace, broadcast, client_state, data, ctx)

    def aggregate(self, updates: Sequence[ClientUpdate], ctx: ServerContext) -> Aggregate:
        return self.inner.aggregate(updates, ctx)

    def server_update(self, state: ServerState, aggregate: Aggregate, ctx: ServerContext) -> ServerState:
        return self.inner.server_update(state, aggregate, ctx)


def test_an_algorithm_without_a_local_plan_runs_sequentially_said_once(
    mnist_dir: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = mnist_config(mnist_dir, "rounds=2")
    comps = replace(build_components(cfg), algorithm=Unplanned())
    seq = SequentialExecutor(comps.workspace, comps.train, comps.pipeline)
    want = run_simulation(cfg, tmp_path / "seq", components=comps, executor=seq).state.params
    with caplog.at_level(logging.WARNING, logger="fedloom"):
        ex = VectorizedExecutor(comps.workspace, comps.train, comps.pipeline)
        got = run_simulation(cfg, tmp_path / "vec", components=comps, executor=ex).state.params
    assert got.equal(want)
    lines = [r.getMessage() for r in caplog.records if r.name == "fedloom"]
    assert len(lines) == 1, lines
    assert "Unplanned declares no local_plan" in lines[0]


# --- corrections on a block ------------------------------------------------------------------------


def _apply(
    correction: GradCorrection, params: list[torch.Tensor], grads: list[torch.Tensor]
) -> list[torch.Tensor]:
    out = [g.clone() for g in grads]
    correction(params, out)
    return out


@pytest.mark.parametrize("shared_anchor", [True, False])
def test_stacked_corrections_act_on_each_row_as_the_clients_own(shared_anchor: bool) -> None:
    from fedloom.algorithms.fedprox import ProximalCorrection
    from fedloom.algorithms.scaffold import _ControlCorrection

    gen = torch.Generator().manual_seed(1)
    shapes, k = [(3, 4), (4,)], 3
    anchor = [torch.randn(s, generator=gen) for s in shapes]
    anchors = [anchor if shared_anchor else [torch.randn(s, generator=gen) for s in shapes] for _ in range(k)]
    params = [torch.randn(k, *s, generator=gen) for s in shapes]
    grads = [torch.randn(k, *s, generator=gen) for s in shapes]
    prox = [ProximalCorrection(0.3, a) for a in anchors]
    control = [_ControlCorrection([torch.randn(s, generator=gen) for s in shapes]) for _ in range(k)]
    for block in (prox, control):
        stacked = block[0].stack(block, torch.device("cpu"))
        assert not isinstance(stacked, str)
        together = _apply(stacked, params, grads)
        for j, own in enumerate(block):
            alone = _apply(own, [p[j] for p in params], [g[j] for g in grads])
            for t, a in zip(together, alone, strict=True):
                assert torch.equal(t[j], a), j
    assert "different mu" in str(
        prox[0].stack([prox[0], ProximalCorrection(0.1, anchor)], torch.device("cpu"))
    )
    assert "mixes" in str(prox[0].stack([prox[0], control[0]], torch.device("cpu")))
