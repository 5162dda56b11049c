"""FedAvg one-round golden values computed by hand (linear model, MSE, two SGD steps)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedloom.algorithms import (
    ClientContext,
    FedAvg,
    LocalSGD,
    ServerContext,
    ServerSGD,
    Workspace,
)
from fedloom.core.params import Params
from fedloom.data.datasets import ArrayDataset

# Hand computation (w0 = 0.5, lr = 0.1, batch 2, 2 epochs => 2 full-batch steps per client):
#   L(w) = mean((w x - y)^2), dL/dw = mean(2 (w x - y) x)
#   A = {(1, 2)}:        w: 0.5 -> 0.8 -> 1.04          delta_A =  0.54
#   B = {(1, 1),(2, 2)}: w: 0.5 -> 0.75 -> 0.875        delta_B =  0.375
#   C = {(2, 0)}:        w: 0.5 -> 0.1 -> 0.02          delta_C = -0.48
#   FedAvg (weights 1, 2, 1): delta = (0.54 + 0.75 - 0.48) / 4 = 0.2025
CLIENTS = {0: ([1.0], [2.0]), 1: ([1.0, 2.0], [1.0, 2.0]), 2: ([2.0], [0.0])}
EXPECTED_DELTAS = {0: 0.54, 1: 0.375, 2: -0.48}


def _run_client(algo: FedAvg, cid: int, w0: float) -> float:
    xs, ys = CLIENTS[cid]
    ws = Workspace(nn.Linear(1, 1, bias=False), loss_fn=nn.MSELoss())
    # Encode the regression target in the input: the model sees x, loss compares with y.
    data = ArrayDataset(torch.tensor(xs).reshape(-1, 1), torch.arange(len(xs), dtype=torch.int64))
    targets = torch.tensor(ys).reshape(-1, 1)
    ws.loss_fn = _IndexedMSE(data.x, targets)
    bc = algo.broadcast(algo.server_init(Params({"weight": torch.tensor([[w0]])})))
    upd = algo.client_update(ws, bc, None, data, ClientContext(seed=0, round=1, client_id=cid))
    return float(upd.delta["weight"])


class _IndexedMSE(nn.Module):
    """MSE where each example's target is found by matching its input row."""

    def __init__(self, xs: torch.Tensor, ys: torch.Tensor) -> None:
        super().__init__()
        self.xs, self.ys = xs, ys

    def forward(self, pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.mean((pred - self.ys[labels]) ** 2)


@pytest.mark.parametrize("cid", [0, 1, 2])
def test_client_delta_matches_hand_computation(cid: int) -> None:
    algo = FedAvg(local=LocalSGD(lr=0.1, epochs=2, batch_size=2))
    assert _run_client(algo, cid, 0.5) == pytest.approx(EXPECTED_DELTAS[cid], abs=1e-6)


def _round(algo: FedAvg, w0: float) -> float:
    state = algo.server_init(Params({"weight": torch.tensor([[w0]])}))
    bc = algo.broadcast(state)
    updates = []
    for cid, (xs, ys) in CLIENTS.items():
        ws = Workspace(nn.Linear(1, 1, bias=False))
        data = ArrayDataset(torch.tensor(xs).reshape(-1, 1), torch.arange(len(xs), dtype=torch.int64))
        ws.loss_fn = _IndexedMSE(data.x, torch.tensor(ys).reshape(-1, 1))
        updates.append(algo.client_update(ws, bc, None, data, ClientContext(seed=0, round=1, client_id=cid)))
    ctx = ServerContext(seed=0, round=1, population=3)
    agg = algo.aggregate(updates, ctx)
    assert agg.total_weight == 4.0
    return float(algo.server_update(state, agg, ctx).params["weight"])


def test_fedavg_round_is_example_weighted_mean() -> None:
    algo = FedAvg(local=LocalSGD(lr=0.1, epochs=2, batch_size=2))
    assert _round(algo, 0.5) == pytest.approx(0.5 + 0.2025, abs=1e-6)


def test_server_learning_rate_scales_the_aggregate() -> None:
    algo = FedAvg(local=LocalSGD(lr=0.1, epochs=2, batch_size=2), server_optimizer=ServerSGD(lr=0.5))
    assert _round(algo, 0.5) == pytest.approx(0.5 + 0.5 * 0.2025, abs=1e-6)


def test_fixed_local_steps_override_epochs() -> None:
    # Client A with steps=1: w 0.5 -> 0.8, delta 0.3 regardless of epochs.
    algo = FedAvg(local=LocalSGD(lr=0.1, epochs=5, batch_size=2, steps=1))
    assert _run_client(algo, 0, 0.5) == pytest.approx(0.3, abs=1e-6)


def test_server_momentum_accumulates() -> None:
    # m1 = d; m2 = 0.9 d + d.  With a constant delta d, params move by d then 1.9 d.
    opt = ServerSGD(lr=1.0, momentum=0.9)
    p = Params({"w": torch.tensor([0.0])})
    d = Params({"w": torch.tensor([1.0])})
    slots = opt.init(p)
    p1, slots = opt.step(p, d, slots, 1)
    p2, _ = opt.step(p1, d, slots, 2)
    assert float(p1["w"]) == pytest.approx(1.0)
    assert float(p2["w"]) == pytest.approx(2.9)


def test_mean_training_loss_is_the_step_losses_summed_in_float64() -> None:
    from fedloom.algorithms import local_sgd

    # Two examples in one full batch: the batch mean and its gradient do not depend on the
    # shuffle, so a hand replay of plain SGD gives the same three step losses.
    x, y = torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0], [-1.0]])
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.3)
    start = Params({"weight": model.weight.detach().clone()})
    replay: list[float] = []
    w = torch.tensor([[0.3]], requires_grad=True)
    for _ in range(3):
        loss = torch.mean((x @ w.T - y) ** 2)
        (g,) = torch.autograd.grad(loss, [w])
        with torch.no_grad():
            w -= 0.05 * g
        replay.append(loss.item())
    assert len(set(replay)) == 3  # three different float32 losses
    ws = Workspace(model, loss_fn=nn.MSELoss())
    result = local_sgd(
        ws, start, ArrayDataset(x, y), LocalSGD(lr=0.05, epochs=3, batch_size=2), ClientContext(0, 1, 0)
    )
    assert result.num_steps == 3
    assert result.mean_loss == (replay[0] + replay[1] + replay[2]) / 3
