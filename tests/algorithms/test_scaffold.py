"""SCAFFOLD: hand-computed round (both options), FedAvg equivalence, and removal of client drift."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pytest
import torch

from fedloom.algorithms import (
    ClientContext,
    ClientState,
    FedAvg,
    LocalSGD,
    Scaffold,
    ServerContext,
    ServerState,
    Workspace,
)
from fedloom.algorithms.scaffold import full_gradient
from fedloom.core.params import Params
from fedloom.data.datasets import ArrayDataset

ToyClient = Callable[[Sequence[float], Sequence[float]], tuple[Workspace, ArrayDataset]]
TOY = [([1.0], [2.0]), ([1.0, 2.0], [1.0, 2.0]), ([2.0], [0.0])]


def w(p: Params) -> float:
    return float(p["weight"])


# Hand computation: x = 0.5, c = 0.2, c_A = -0.3, c_B = c_C = 0 (no state yet), lr = 0.1,
# K = 2 full-batch steps, N = 4 clients of which |S| = 3 take part, lr_g = 1.
#   local step y <- y - 0.1 (L'(y) + c - c_i)
#   A: L' = 2(y - 2), c - c_A = 0.5:  0.5 -> 0.75  -> 0.95    delta_A =  0.45
#   B: L' = 5(y - 1), c - c_B = 0.2:  0.5 -> 0.73  -> 0.845   delta_B =  0.345
#   C: L' = 8 y,      c - c_C = 0.2:  0.5 -> 0.08  -> -0.004  delta_C = -0.504
#   x+ = 0.5 + (0.45 + 0.345 - 0.504) / 3 = 0.597 (unweighted mean)
# Option II, c_i+ = c_i - c - delta_i / (K lr) = c_i - 0.2 - 5 delta_i:
#   A: -0.3 - 0.2 - 2.25 = -2.75 (dc -2.45);  B: -0.2 - 1.725 = -1.925;  C: -0.2 + 2.52 = 2.32
#   c+ = 0.2 + (3/4) * (-2.45 - 1.925 + 2.32) / 3 = 0.2 - 0.51375 = -0.31375
# Option I, c_i+ = L'(x) at x = 0.5:  A: -3 (dc -2.7);  B: -2.5;  C: 4
#   c+ = 0.2 + (3/4) * (-2.7 - 2.5 + 4) / 3 = -0.1
GOLDEN = {
    "II": {"c_i": [-2.75, -1.925, 2.32], "c": -0.31375},
    "I": {"c_i": [-3.0, -2.5, 4.0], "c": -0.1},
}


@pytest.mark.parametrize("option", ["I", "II"])
def test_one_round_golden(
    option: str, toy_client: ToyClient, scalar_params: Callable[[float], Params]
) -> None:
    algo = Scaffold(local=LocalSGD(lr=0.1, epochs=2, batch_size=2), option=option)  # type: ignore[arg-type]
    state = ServerState(round=0, params=scalar_params(0.5), algo_state={"control": scalar_params(0.2)})
    bc = algo.broadcast(state)
    states = [ClientState({"control": scalar_params(-0.3)}), None, None]
    updates = [
        algo.client_update(ws, bc, cs, data, ClientContext(seed=0, round=1, client_id=cid))
        for cid, ((ws, data), cs) in enumerate(zip([toy_client(x, y) for x, y in TOY], states, strict=True))
    ]
    assert [w(u.delta) for u in updates] == pytest.approx([0.45, 0.345, -0.504], abs=1e-6)
    new_ci = [w(u.client_state.values["control"]) for u in updates if u.client_state is not None]
    assert new_ci == pytest.approx(GOLDEN[option]["c_i"], abs=1e-5)
    old_ci = [-0.3, 0.0, 0.0]
    dcs = [w(u.extras["control_delta"]) for u in updates]
    assert dcs == pytest.approx([n - o for n, o in zip(new_ci, old_ci, strict=True)], abs=1e-5)
    ctx = ServerContext(seed=0, round=1, population=4)
    new = algo.server_update(state, algo.aggregate(updates, ctx), ctx)
    assert w(new.params) == pytest.approx(0.597, abs=1e-6)
    assert w(new.algo_state["control"]) == pytest.approx(GOLDEN[option]["c"], abs=1e-5)
    assert new.round == 1


def test_zero_control_variates_equal_unweighted_fedavg(
    logreg_clients: Callable[[Sequence[int]], list[tuple[Workspace, ArrayDataset]]], logreg_params: Params
) -> None:
    # FedAvg weighting every client 1 is the unweighted mean SCAFFOLD uses.
    local = LocalSGD(lr=0.1, epochs=2, batch_size=4)
    results = []
    for algo in (
        FedAvg(local=local, weighting="uniform"),
        Scaffold(local=local, option="I"),
        Scaffold(local=local, option="II"),
    ):
        state = algo.server_init(logreg_params)
        bc = algo.broadcast(state)
        updates = [
            algo.client_update(ws, bc, None, data, ClientContext(seed=5, round=1, client_id=cid))
            for cid, (ws, data) in enumerate(logreg_clients([9, 9, 9]))
        ]
        ctx = ServerContext(seed=5, round=1, population=3)
        results.append(algo.server_update(state, algo.aggregate(updates, ctx), ctx).params)
    assert results[1].equal(results[0])
    assert results[2].equal(results[0])


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_full_gradient_is_the_mean_gradient_whatever_the_batch(
    batch_size: int, toy_client: ToyClient
) -> None:
    ws, data = toy_client([1.0, 2.0], [1.0, 2.0])  # L(w) = 2.5 (w - 1)^2, L'(0.5) = -2.5
    g = full_gradient(ws, Params({"weight": torch.tensor([[0.5]])}), data, batch_size)
    assert float(g["weight"]) == pytest.approx(-2.5, abs=1e-6)


# Client drift. Client i has f_i(w) = a_i / 2 (w - b_i)^2 (one example, x = sqrt(a_i / 2),
# y = x b_i). The global objective mean_i f_i is minimised at w* = sum a_i b_i / sum a_i = 11/7.
# FedAvg with K local steps of size lr (full participation) has the fixed point
# w_avg = sum (1 - q_i) b_i / sum (1 - q_i), q_i = (1 - lr a_i)^K: about 0.74 here, not w*.
CURV, OPT = [1.0, 2.0, 4.0], [-1.0, 0.0, 3.0]
LR, K = 0.1, 20


def _drift_run(algo: FedAvg | Scaffold, toy_client: ToyClient, rounds: int) -> float:
    clients = [toy_client([math.sqrt(a / 2)], [math.sqrt(a / 2) * b]) for a, b in zip(CURV, OPT, strict=True)]
    state = algo.server_init(Params({"weight": torch.zeros(1, 1)}))
    cstates: dict[int, ClientState] = {}
    for r in range(1, rounds + 1):
        bc = algo.broadcast(state)
        updates = [
            algo.client_update(ws, bc, cstates.get(cid), data, ClientContext(seed=0, round=r, client_id=cid))
            for cid, (ws, data) in enumerate(clients)
        ]
        cstates.update({u.client_id: u.client_state for u in updates if u.client_state is not None})
        ctx = ServerContext(seed=0, round=r, population=len(clients))
        state = algo.server_update(state, algo.aggregate(updates, ctx), ctx)
    return w(state.params)


def test_fedavg_drifts_and_scaffold_reaches_the_true_optimum(toy_client: ToyClient) -> None:
    w_star = sum(a * b for a, b in zip(CURV, OPT, strict=True)) / sum(CURV)
    q = [(1 - LR * a) ** K for a in CURV]
    w_avg = sum((1 - qi) * b for qi, b in zip(q, OPT, strict=True)) / sum(1 - qi for qi in q)
    local = LocalSGD(lr=LR, batch_size=1, steps=K)
    fedavg = _drift_run(FedAvg(local=local), toy_client, rounds=30)
    assert fedavg == pytest.approx(w_avg, abs=1e-4)
    assert abs(fedavg - w_star) > 0.8  # FedAvg's bias: 0.74 vs 1.571
    for option in ("I", "II"):
        scaffold = _drift_run(Scaffold(local=local, option=option), toy_client, rounds=100)  # type: ignore[arg-type]
        assert scaffold == pytest.approx(w_star, abs=1e-4), option
