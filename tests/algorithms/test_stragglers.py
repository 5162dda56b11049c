"""Stragglers: the draw, FedAvg dropping them, and an all-dropped round."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

from fedloom.algorithms import (
    ClientContext,
    FedAvg,
    FedNova,
    LocalSGD,
    Scaffold,
    ServerAdam,
    ServerContext,
    Stragglers,
    Workspace,
)
from fedloom.core.params import Params
from fedloom.data.datasets import ArrayDataset

Clients = list[tuple[Workspace, ArrayDataset]]


def test_plan_draws_partial_steps_from_the_client_coordinates() -> None:
    s = Stragglers(fraction=0.3)
    plans = [s.plan(10, ClientContext(seed=0, round=r, client_id=c)) for r in range(1, 41) for c in range(50)]
    share = sum(p.straggler for p in plans) / len(plans)
    assert share == pytest.approx(0.3, abs=0.03)
    assert all(1 <= p.steps < 10 for p in plans if p.straggler)
    assert all(p.steps == 10 for p in plans if not p.straggler)
    assert {p.steps for p in plans if p.straggler} == set(range(1, 10))
    assert s.plan(10, ClientContext(0, 7, 3)) == s.plan(10, ClientContext(0, 7, 3))
    assert Stragglers().plan(10, ClientContext(0, 1, 1)).straggler is False


def test_drop_stragglers_aggregates_only_the_others(
    logreg_clients: Callable[[Sequence[int]], Clients], logreg_params: Params
) -> None:
    local = LocalSGD(lr=0.1, batch_size=4, steps=5)
    stragglers = Stragglers(fraction=0.5, drop=True)
    dropping = FedAvg(local=local, stragglers=stragglers)
    clients = logreg_clients([8, 11, 6, 9, 14, 7, 10, 5])
    ctxs = [ClientContext(seed=2, round=1, client_id=cid) for cid in range(len(clients))]
    slow = [stragglers.plan(5, ctx).straggler for ctx in ctxs]
    assert any(slow)
    assert not all(slow)
    bc = dropping.broadcast(dropping.server_init(logreg_params))
    updates = [
        dropping.client_update(ws, bc, None, d, ctx) for (ws, d), ctx in zip(clients, ctxs, strict=True)
    ]
    assert [u.metrics.get("dropped", 0.0) == 1.0 for u in updates] == slow
    sctx = ServerContext(seed=2, round=1, population=len(clients))
    agg = dropping.aggregate(updates, sctx)

    plain = FedAvg(local=local)
    kept = [
        plain.client_update(ws, bc, None, d, ctx)
        for (ws, d), ctx, s in zip(clients, ctxs, slow, strict=True)
        if not s
    ]
    ref = plain.aggregate(kept, sctx)
    assert agg.num_clients == len(kept)
    assert agg.total_weight == ref.total_weight
    assert agg.delta.equal(ref.delta)


@pytest.mark.parametrize(
    "algo",
    [
        FedAvg(local=LocalSGD(steps=3), server_optimizer=ServerAdam(), stragglers=Stragglers(1.0, drop=True)),
        Scaffold(local=LocalSGD(steps=3), stragglers=Stragglers(1.0, drop=True)),
        FedNova(local=LocalSGD(steps=3), stragglers=Stragglers(1.0, drop=True)),
    ],
    ids=["fedadam", "scaffold", "fednova"],
)
def test_a_round_with_every_client_dropped_changes_nothing(
    algo: FedAvg | Scaffold | FedNova,
    logreg_clients: Callable[[Sequence[int]], Clients],
    logreg_params: Params,
) -> None:
    state = algo.server_init(logreg_params)
    bc = algo.broadcast(state)
    updates = [
        algo.client_update(ws, bc, None, d, ClientContext(seed=0, round=1, client_id=cid))
        for cid, (ws, d) in enumerate(logreg_clients([6, 6]))
    ]
    assert all(u.client_state is None and u.num_steps == 0 for u in updates)
    ctx = ServerContext(seed=0, round=1, population=2)
    new = algo.server_update(state, algo.aggregate(updates, ctx), ctx)
    assert new.round == 1
    assert new.params.equal(state.params)
    assert new.opt_state == state.opt_state
    assert new.algo_state == state.algo_state
