"""FedNova: equal step counts give FedAvg bit for bit; unequal steps are normalised (hand-computed)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

from fedloom.algorithms import (
    Algorithm,
    ClientContext,
    FedAvg,
    FedNova,
    LocalSGD,
    ServerContext,
    Workspace,
)
from fedloom.algorithms.fednova import nova_coefficients
from fedloom.core.params import Params
from fedloom.data.datasets import ArrayDataset

Clients = list[tuple[Workspace, ArrayDataset]]


def one_round(algo: Algorithm, params: Params, clients: Clients) -> Params:
    state = algo.server_init(params)
    bc = algo.broadcast(state)
    updates = [
        algo.client_update(ws, bc, None, data, ClientContext(seed=1, round=1, client_id=cid))
        for cid, (ws, data) in enumerate(clients)
    ]
    ctx = ServerContext(seed=1, round=1, population=len(clients))
    return algo.server_update(state, algo.aggregate(updates, ctx), ctx).params


def test_equal_step_counts_give_fedavg_bit_for_bit(
    logreg_clients: Callable[[Sequence[int]], Clients], logreg_params: Params
) -> None:
    # Different client sizes (so different example weights) but a fixed number of steps.
    local = LocalSGD(lr=0.1, batch_size=4, steps=6)
    fedavg = one_round(FedAvg(local=local), logreg_params, logreg_clients([7, 13, 5, 21]))
    fednova = one_round(FedNova(local=local), logreg_params, logreg_clients([7, 13, 5, 21]))
    assert fednova.equal(fedavg)


# Hand computation (w0 = 0.5, lr = 0.1, batch 1, 2 epochs, so tau = 2 x examples):
#   A = {(1, 2)}:          L = (w - 2)^2, 2 steps: 0.5 -> 0.8 -> 1.04            delta 0.54,   tau 2
#   B = {(1, 1), (1, 1)}:  each step w <- w - 0.2 (w - 1), 4 steps:
#                          0.5 -> 0.6 -> 0.68 -> 0.744 -> 0.7952                   delta 0.2952, tau 4
#   p = (1/3, 2/3), tau_eff = 2/3 + 8/3 = 10/3
#   FedNova: 10/3 * (1/3 * 0.54/2 + 2/3 * 0.2952/4) = 10/3 * (0.09 + 0.0492) = 0.464
#   (FedAvg would give (0.54 + 2 * 0.2952) / 3 = 0.3768)
def test_unequal_steps_golden(
    toy_client: Callable[[Sequence[float], Sequence[float]], tuple[Workspace, ArrayDataset]],
    scalar_params: Callable[[float], Params],
) -> None:
    clients = [toy_client([1.0], [2.0]), toy_client([1.0, 1.0], [1.0, 1.0])]
    local = LocalSGD(lr=0.1, epochs=2, batch_size=1)
    assert float(one_round(FedNova(local=local), scalar_params(0.5), clients)["weight"]) == pytest.approx(
        0.5 + 0.464, abs=1e-6
    )
    assert float(one_round(FedAvg(local=local), scalar_params(0.5), clients)["weight"]) == pytest.approx(
        0.5 + 0.3768, abs=1e-6
    )


def test_coefficients() -> None:
    # n_i * tau_eff / tau_i with tau_eff = sum_j n_j tau_j / sum_j n_j = 10 / 3
    assert nova_coefficients([1.0, 2.0], [2, 4]) == pytest.approx([1 * (10 / 3) / 2, 2 * (10 / 3) / 4])
    assert nova_coefficients([3.0, 5.0], [7, 7]) == [3.0, 5.0]
