"""FedAdam / FedYogi / FedAdagrad server steps against a hand computation of arXiv 2003.00295, Alg. 2.

Two steps from x0 = (1, -2, 0.5) with pseudo-gradients D1 = (0.5, -0.2, 0), D2 = (0.01, 0.3, -0.04),
eta = 0.1, beta1 = 0.9, beta2 = 0.99, tau = 1e-3, m_{-1} = 0, v_{-1} = tau^2 = 1e-6:

    m1 = 0.1 D1 = (0.05, -0.02, 0);   m2 = 0.9 m1 + 0.1 D2 = (0.046, 0.012, -0.004)
    Adam:    v1 = 0.99e-6 + 0.01 D1^2 = (0.00250099, 0.00040099, 9.9e-7)
             v2 = 0.99 v1 + 0.01 D2^2 = (0.00247698, 0.00129698, 1.698e-5)
    Yogi:    v1 = v0 + 0.01 D1^2 (v0 < D1^2; unchanged where D1 = 0) = (0.002501, 0.000401, 1e-6)
             v2: element 0 has v1 > D2^2 = 1e-4, so it *shrinks*: 0.002501 - 1e-6 = 0.0025;
                 the others grow: (0.0025, 0.001301, 1.7e-5)
    Adagrad: v1 = v0 + D1^2 = (0.250001, 0.040001, 1e-6);  v2 = v1 + D2^2 = (0.250101, 0.130001, 0.001601)
    x_t = x_{t-1} + 0.1 m_t / (sqrt(v_t) + 1e-3), e.g. Adam x1[0] = 1 + 0.1 * 0.05 / (0.0500100 + 0.001).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from fedloom.algorithms import (
    ClientContext,
    ServerAdagrad,
    ServerAdam,
    ServerContext,
    ServerOptimizer,
    ServerSGD,
    ServerYogi,
    Workspace,
)
from fedloom.config import load_config
from fedloom.core.params import Params
from fedloom.data.datasets import ArrayDataset
from fedloom.sim.build import build_algorithm

X0 = [1.0, -2.0, 0.5]
D1, D2 = [0.5, -0.2, 0.0], [0.01, 0.3, -0.04]
EXPECTED = {
    "adam": (
        [1.0980202, -2.0951261, 0.5],
        [1.1886262, -2.0627055, 0.4218856],
        [0.00247698, 0.00129698, 1.698e-05],
    ),
    "yogi": ([1.09802, -2.0951249, 0.5], [1.1882161, -2.0627532, 0.4219224], [0.0025, 0.001301, 1.7e-05]),
    "adagrad": (
        [1.00998, -2.0099501, 0.5],
        [1.0191598, -2.0066311, 0.4902469],
        [0.250101, 0.130001, 0.001601],
    ),
}
OPTIMIZERS: dict[str, ServerOptimizer] = {
    "adam": ServerAdam(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3),
    "yogi": ServerYogi(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3),
    "adagrad": ServerAdagrad(lr=0.1, beta1=0.9, tau=1e-3),
}


def vec(values: list[float]) -> Params:
    return Params({"w": torch.tensor(values, dtype=torch.float64)})


@pytest.mark.parametrize("kind", ["adam", "yogi", "adagrad"])
def test_two_server_steps_match_hand_computation(kind: str) -> None:
    opt = OPTIMIZERS[kind]
    x0 = vec(X0)
    slots = opt.init(x0)
    assert torch.equal(slots["v"]["w"], torch.full((3,), 1e-6, dtype=torch.float64))
    assert torch.equal(slots["m"]["w"], torch.zeros(3, dtype=torch.float64))
    x1, slots = opt.step(x0, vec(D1), slots, 1)
    x2, slots = opt.step(x1, vec(D2), slots, 2)
    want_x1, want_x2, want_v2 = EXPECTED[kind]
    assert x1["w"].tolist() == pytest.approx(want_x1, abs=1e-7)
    assert x2["w"].tolist() == pytest.approx(want_x2, abs=1e-7)
    assert slots["v"]["w"].tolist() == pytest.approx(want_v2, abs=1e-9)
    assert slots["m"]["w"].tolist() == pytest.approx([0.046, 0.012, -0.004], abs=1e-12)
    assert x0["w"].tolist() == X0  # inputs are never mutated


def test_server_sgd_is_untouched_by_the_adaptive_family() -> None:
    x1, slots = ServerSGD().step(vec(X0), vec(D1), {}, 1)
    assert x1["w"].tolist() == pytest.approx([1.5, -2.2, 0.5])
    assert slots == {}


@pytest.mark.parametrize("bad", [{"lr": 0.0}, {"beta1": 1.0}, {"beta2": -0.1}, {"tau": 0.0}])
def test_invalid_hyperparameters_are_named(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        ServerAdam(**bad)


# One FedAdam round on the three clients of test_fedavg_golden.py (w0 = 0.5, local lr 0.1, two
# full-batch steps): client deltas 0.54, 0.375, -0.48 on 1, 2, 1 examples.
#   uniform (Alg. 2):  D = (0.54 + 0.375 - 0.48) / 3 = 0.145
#   examples:          D = (0.54 + 2 * 0.375 - 0.48) / 4 = 0.2025
#   Adam from m = 0, v = tau^2 = 1e-6 (eta 0.1, beta1 0.9, beta2 0.99, tau 1e-3):
#   m1 = 0.1 D, v1 = 0.99e-6 + 0.01 D^2, w1 = 0.5 + 0.1 m1 / (sqrt(v1) + 1e-3)
GOLDEN_CLIENTS = {0: ([1.0], [2.0]), 1: ([1.0, 2.0], [1.0, 2.0]), 2: ([2.0], [0.0])}


def _adam_one_step(d: float) -> float:
    m1 = 0.1 * d
    v1 = 0.99e-6 + 0.01 * d * d
    return 0.5 + 0.1 * m1 / (v1**0.5 + 1e-3)


@pytest.mark.parametrize(("weighting", "pseudo_gradient"), [("uniform", 0.145), ("examples", 0.2025)])
def test_fedadam_round_weights_clients_as_configured(
    weighting: str, pseudo_gradient: float, toy_client: Callable[..., tuple[Workspace, ArrayDataset]]
) -> None:
    cfg = load_config(
        None,
        (
            "server.optimizer=adam",
            "server.lr=0.1",
            "server.beta1=0.9",
            "server.beta2=0.99",
            "server.tau=0.001",
            f"server.weighting={weighting}",
            "client.lr=0.1",
            "client.epochs=2",
            "client.batch_size=2",
        ),
    )
    algo = build_algorithm(cfg)
    state = algo.server_init(Params({"weight": torch.tensor([[0.5]])}))
    bc = algo.broadcast(state)
    updates = []
    for cid, (xs, ys) in GOLDEN_CLIENTS.items():
        ws, data = toy_client(xs, ys)
        updates.append(algo.client_update(ws, bc, None, data, ClientContext(seed=0, round=1, client_id=cid)))
    ctx = ServerContext(seed=0, round=1, population=3)
    agg = algo.aggregate(updates, ctx)
    assert float(agg.delta["weight"]) == pytest.approx(pseudo_gradient, abs=1e-6)
    new = algo.server_update(state, agg, ctx)
    assert float(new.params["weight"]) == pytest.approx(_adam_one_step(pseudo_gradient), abs=1e-6)
