"""FedProx: the proximal term (hand-computed round), mu = 0 is FedAvg, stragglers' partial work."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

from fedloom.algorithms import (
    Algorithm,
    ClientContext,
    ClientUpdate,
    FedAvg,
    FedProx,
    LocalSGD,
    ServerContext,
    ServerState,
    Stragglers,
    Workspace,
)
from fedloom.core.params import Params
from fedloom.data.datasets import ArrayDataset

Clients = list[tuple[Workspace, ArrayDataset]]


def one_round(algo: Algorithm, params: Params, clients: Clients) -> tuple[ServerState, list[ClientUpdate]]:
    state = algo.server_init(params)
    bc = algo.broadcast(state)
    updates = [
        algo.client_update(ws, bc, None, data, ClientContext(seed=3, round=1, client_id=cid))
        for cid, (ws, data) in enumerate(clients)
    ]
    ctx = ServerContext(seed=3, round=1, population=len(clients))
    return algo.server_update(state, algo.aggregate(updates, ctx), ctx), updates


def test_mu_zero_without_stragglers_is_fedavg_bit_for_bit(
    logreg_clients: Callable[[Sequence[int]], Clients], logreg_params: Params
) -> None:
    local = LocalSGD(lr=0.1, epochs=2, batch_size=4)
    fedavg, _ = one_round(FedAvg(local=local), logreg_params, logreg_clients([7, 12, 5]))
    fedprox, _ = one_round(FedProx(local=local, mu=0.0), logreg_params, logreg_clients([7, 12, 5]))
    assert fedprox.params.equal(fedavg.params)


def test_positive_mu_changes_the_result(
    logreg_clients: Callable[[Sequence[int]], Clients], logreg_params: Params
) -> None:
    local = LocalSGD(lr=0.1, epochs=2, batch_size=4)
    fedavg, _ = one_round(FedAvg(local=local), logreg_params, logreg_clients([7, 12, 5]))
    fedprox, _ = one_round(FedProx(local=local, mu=0.5), logreg_params, logreg_clients([7, 12, 5]))
    assert not fedprox.params.allclose(fedavg.params)


# Hand computation (w0 = 0.5, lr = 0.1, mu = 1, two full-batch steps; L as in conftest):
#   grad h(w) = grad L(w) + mu (w - 0.5)
#   A = {(1, 2)}:         L' = 2(w - 2)   w: 0.5 -> 0.8  -> 0.8 - 0.1(-2.4 + 0.3)  = 1.01   delta  0.51
#   B = {(1, 1), (2, 2)}: L' = 5(w - 1)   w: 0.5 -> 0.75 -> 0.75 - 0.1(-1.25 + 0.25) = 0.85 delta  0.35
#   C = {(2, 0)}:         L' = 8 w        w: 0.5 -> 0.1  -> 0.1 - 0.1(0.8 - 0.4)    = 0.06   delta -0.44
#   weights (1, 2, 1): delta = (0.51 + 0.70 - 0.44) / 4 = 0.1925
TOY = [([1.0], [2.0]), ([1.0, 2.0], [1.0, 2.0]), ([2.0], [0.0])]


def test_one_round_golden(
    toy_client: Callable[[Sequence[float], Sequence[float]], tuple[Workspace, ArrayDataset]],
    scalar_params: Callable[[float], Params],
) -> None:
    algo = FedProx(local=LocalSGD(lr=0.1, epochs=2, batch_size=2), mu=1.0)
    state, updates = one_round(algo, scalar_params(0.5), [toy_client(x, y) for x, y in TOY])
    deltas = [float(u.delta["weight"]) for u in updates]
    assert deltas == pytest.approx([0.51, 0.35, -0.44], abs=1e-6)
    assert float(state.params["weight"]) == pytest.approx(0.5 + 0.1925, abs=1e-6)


def test_stragglers_partial_work_is_accepted_with_the_drawn_step_counts(
    logreg_clients: Callable[[Sequence[int]], Clients], logreg_params: Params
) -> None:
    local = LocalSGD(lr=0.1, batch_size=4, steps=10)
    stragglers = Stragglers(fraction=0.5)
    algo = FedProx(local=local, mu=0.1, stragglers=stragglers)
    clients = logreg_clients([20] * 12)
    _, updates = one_round(algo, logreg_params, clients)
    seen_straggler = seen_full = False
    for cid, u in enumerate(updates):
        plan = stragglers.plan(10, ClientContext(seed=3, round=1, client_id=cid))
        assert u.num_steps == plan.steps
        assert u.metrics.get("straggler", 0.0) == (1.0 if plan.straggler else 0.0)
        if plan.straggler:
            seen_straggler = True
            assert 1 <= u.num_steps < 10
            # The partial work is exactly the first `steps` steps of the same local run.
            ws, data = clients[cid]
            short = FedProx(local=LocalSGD(lr=0.1, batch_size=4, steps=plan.steps), mu=0.1)
            ref = short.client_update(
                ws, short.broadcast(short.server_init(logreg_params)), None, data, ClientContext(3, 1, cid)
            )
            assert u.delta.equal(ref.delta)
        else:
            seen_full = True
            assert u.num_steps == 10
    assert seen_straggler
    assert seen_full
    assert all(u.weight > 0 for u in updates)  # nobody is dropped


def test_fedprox_refuses_to_drop_stragglers() -> None:
    with pytest.raises(ValueError, match="partial work"):
        FedProx(stragglers=Stragglers(fraction=0.5, drop=True))
