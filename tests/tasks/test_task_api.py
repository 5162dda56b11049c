"""The task API: a user's loss, optimiser, metrics and training loop, checked against hand computation."""

from __future__ import annotations

import gc
import itertools
import weakref
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fedloom
from fedloom import ArrayDataset, CentralData, ClientData, LocalOptimizer, Task, TrainContext
from fedloom.algorithms import ClientContext, LocalSGD
from fedloom.algorithms.fedavg import FedAvg
from fedloom.algorithms.fedprox import FedProx
from fedloom.algorithms.scaffold import Scaffold
from fedloom.core.errors import TaskError, TrainingError
from fedloom.core.params import Params
from fedloom.metrics import accuracy, auc, f1, mae, mse, perplexity
from fedloom.tasks import PartitionSpec, materialise

X = np.array([[1.0, 2.0], [3.0, -1.0]], dtype=np.float32)
Y = np.array([0.5, -1.0], dtype=np.float32)
W0 = np.array([0.1, -0.2], dtype=np.float32)
B0 = np.float32(0.05)


def _linear() -> nn.Module:
    layer = nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(W0).reshape(1, 2))
        layer.bias.fill_(float(B0))
    return layer


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out.reshape(-1) - y) ** 2).mean()


def _grad(w: np.ndarray, b: float) -> tuple[np.ndarray, float]:
    """Gradient of the mean squared error of the two examples, in float64."""
    x, y = X.astype(np.float64), Y.astype(np.float64)
    r = x @ w + b - y  # (2,)
    return (2.0 / len(y)) * (x.T @ r), float((2.0 / len(y)) * r.sum())


def _hand_momentum(steps: int, lr: float, momentum: float, wd: float) -> np.ndarray:
    w, b = W0.astype(np.float64), float(B0)
    bw, bb = np.zeros(2), 0.0
    for t in range(steps):
        gw, gb = _grad(w, b)
        gw, gb = gw + wd * w, gb + wd * b
        bw, bb = (gw, gb) if t == 0 else (momentum * bw + gw, momentum * bb + gb)
        w, b = w - lr * bw, b - lr * bb
    return np.append(w, b)


def _hand_adam(steps: int, lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> np.ndarray:
    theta = np.append(W0.astype(np.float64), float(B0))
    m, v = np.zeros(3), np.zeros(3)
    for t in range(1, steps + 1):
        gw, gb = _grad(theta[:2], theta[2])
        g = np.append(gw, gb)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        theta = theta - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return theta


def _one_client_task(optimizer: LocalOptimizer, **extra: object) -> Task:
    data = ClientData(train=[ArrayDataset(X, Y)], test=ArrayDataset(X, Y))
    return Task(
        model=_linear, data=data, loss=_mse, optimizer=optimizer, metrics={"mse": mse, "mae": mae}, **extra
    )  # type: ignore[arg-type]


SETTINGS = {
    "rounds": 1,
    "data.num_clients": 1,
    "sampling.fraction": 1.0,
    "client.batch_size": 2,
    "client.epochs": 3,
    "client.lr": 0.1,
    "eval.target_accuracy": 0.0,
    "executor": "sequential",
}


def _final(history: fedloom.History) -> np.ndarray:
    p = history.final_params
    return np.append(p["weight"].numpy().reshape(-1), p["bias"].numpy()).astype(np.float64)


@pytest.mark.parametrize(("momentum", "wd"), [(0.9, 0.01), (0.0, 0.0)])
def test_sgd_with_momentum_and_weight_decay_matches_hand_computation(
    tmp_path: Path, momentum: float, wd: float
) -> None:
    opt = LocalOptimizer(torch.optim.SGD, {"momentum": momentum, "weight_decay": wd})
    history = fedloom.simulate(_one_client_task(opt), SETTINGS, out=tmp_path / "run", progress=False)
    expected = _hand_momentum(3, 0.1, momentum, wd)
    # float32 arithmetic against the float64 recurrence: a few ulps of float32 over 3 steps.
    np.testing.assert_allclose(_final(history), expected, rtol=1e-6, atol=1e-7)
    # The metrics are of the final model on the test set, computed by hand.
    w = expected
    pred = X.astype(np.float64) @ w[:2] + w[2]
    assert history.final["test_mse"] == pytest.approx(float(np.mean((pred - Y) ** 2)), rel=1e-5)
    assert history.final["test_mae"] == pytest.approx(float(np.mean(np.abs(pred - Y))), rel=1e-5)
    assert history.final["test_loss"] == pytest.approx(float(np.mean((pred - Y) ** 2)), rel=1e-5)


def test_adam_matches_hand_computation(tmp_path: Path) -> None:
    opt = LocalOptimizer(torch.optim.Adam)
    history = fedloom.simulate(_one_client_task(opt), SETTINGS, out=tmp_path / "run", progress=False)
    np.testing.assert_allclose(_final(history), _hand_adam(3, 0.1), rtol=1e-6, atol=1e-7)


def test_lr_schedule_runs_within_a_round(tmp_path: Path) -> None:
    # StepLR halving every step: lrs 0.1, 0.05, 0.025 on plain SGD.
    opt = LocalOptimizer(
        torch.optim.SGD, schedule=lambda o, n: torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5)
    )
    history = fedloom.simulate(_one_client_task(opt), SETTINGS, out=tmp_path / "run", progress=False)
    w, b = W0.astype(np.float64), float(B0)
    for lr in (0.1, 0.05, 0.025):
        gw, gb = _grad(w, b)
        w, b = w - lr * gw, b - lr * gb
    np.testing.assert_allclose(_final(history), np.append(w, b), rtol=1e-6, atol=1e-7)


def test_optimizer_learning_rate_has_one_source() -> None:
    with pytest.raises(ValueError, match="must not set 'lr'"):
        LocalOptimizer(torch.optim.SGD, {"lr": 0.3})


# --- metrics against independent computations -------------------------------------------------


def _pairwise_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_one_logit_bce_accuracy_and_auc_equal_independent_values() -> None:
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(200, 1, generator=gen)
    logits[:10] = 0.25  # ties
    labels = (torch.rand(200, generator=gen) < torch.sigmoid(2 * logits.reshape(-1))).to(torch.float32)
    probs = torch.sigmoid(logits.reshape(-1)).numpy()
    y = labels.numpy().astype(np.int64)
    assert accuracy(logits, labels) == float(np.mean((probs > 0.5) == y))
    assert auc(logits, labels) == pytest.approx(_pairwise_auc(logits.reshape(-1).numpy(), y), abs=1e-12)
    # argmax on one logit (the silent bug) would give accuracy of always predicting class 0:
    assert accuracy(logits, labels) != float(np.mean(y == 0))


def test_regression_language_and_f1_metrics() -> None:
    out = torch.tensor([[1.0], [2.0], [4.0]])
    tgt = torch.tensor([1.5, 2.0, 3.0])
    assert mse(out, tgt) == pytest.approx((0.25 + 0 + 1) / 3)
    assert mae(out, tgt) == pytest.approx((0.5 + 0 + 1) / 3)
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]))
    ids = torch.tensor([0, 1])
    assert perplexity(logits, ids) == pytest.approx(float(np.exp(-(np.log(0.5) + np.log(0.8)) / 2)))
    bin_logits = torch.tensor([2.0, -1.0, 0.5, -3.0, 1.0])
    bin_y = torch.tensor([1, 0, 0, 1, 1])
    # predicted 1,0,1,0,1: tp=2 fp=1 fn=1 -> F1 = 4/6
    assert f1(bin_logits, bin_y) == pytest.approx(4 / 6)


# --- a user-written training loop ---------------------------------------------------------------


def _loop(model: nn.Module, data: ArrayDataset, ctx: TrainContext) -> Mapping[str, float]:
    """The declarative loop's arithmetic, written by hand: SGD over ctx.batches()."""
    opt = ctx.optimizer()
    total = 0.0
    for xb, yb in ctx.batches():
        opt.zero_grad()
        loss = ctx.loss_fn(model(xb), yb)
        loss.backward()
        opt.step()
        total += float(loss.detach())
    return {"train_loss": total / max(ctx.num_steps, 1)}


def _classification_data(seed: int) -> ArrayDataset:
    gen = torch.Generator().manual_seed(seed)
    return ArrayDataset(torch.randn(23, 5, generator=gen), torch.randint(0, 3, (23,), generator=gen), 3)


def _update(algorithm: FedAvg | FedProx | Scaffold, train_fn: object, rounds: int = 2) -> list[Params]:
    """Deltas and control deltas of one client over ``rounds`` rounds, through a task's workspace."""
    task = Task(
        model=lambda: nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)),
        data=ClientData(train=[_classification_data(1)]),
        train=train_fn,  # type: ignore[arg-type]
    )
    m = materialise(task, seed=3, split=PartitionSpec())
    state = algorithm.server_init(m.initial_params)
    cs = None
    out = []
    for r in range(1, rounds + 1):
        b = algorithm.broadcast(state)
        u = algorithm.client_update(m.workspace, b, cs, m.train.client_data(0), ClientContext(3, r, 0))
        out.append(u.delta)
        out.extend(u.extras.values())
        cs = u.client_state
        from fedloom.algorithms.api import ServerContext

        ctx = ServerContext(seed=3, round=r, population=1)
        state = algorithm.server_update(state, algorithm.aggregate([u], ctx), ctx)
    return out


LOCAL = LocalSGD(lr=0.1, epochs=2, batch_size=5)


@pytest.mark.parametrize(
    "algorithm",
    [FedAvg(local=LOCAL), FedProx(local=LOCAL, mu=0.5), Scaffold(local=LOCAL, option="II")],
    ids=["fedavg", "fedprox", "scaffold"],
)
def test_custom_loop_equals_declarative_bit_for_bit(algorithm: FedAvg | FedProx | Scaffold) -> None:
    declarative = _update(algorithm, None)
    custom = _update(algorithm, _loop)
    assert len(declarative) == len(custom)
    for a, b in zip(declarative, custom, strict=True):
        assert a.equal(b)


def test_fedprox_term_is_applied_to_the_custom_loop() -> None:
    prox = _update(FedProx(local=LOCAL, mu=0.5), _loop, rounds=1)[0]
    plain = _update(FedAvg(local=LOCAL), _loop, rounds=1)[0]
    assert not prox.equal(plain)  # without the hook the two would be the same


def _scheduled(algorithm: FedProx, train_fn: object) -> list[Params]:
    """``_update`` with a task whose optimiser has momentum and a step schedule."""
    spec = LocalOptimizer(
        torch.optim.SGD, {"momentum": 0.9}, schedule=lambda o, n: torch.optim.lr_scheduler.StepLR(o, 2, 0.5)
    )
    task = Task(
        model=lambda: nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)),
        data=ClientData(train=[_classification_data(1)]),
        optimizer=spec,
        train=train_fn,  # type: ignore[arg-type]
    )
    m = materialise(task, seed=3, split=PartitionSpec())
    b = algorithm.broadcast(algorithm.server_init(m.initial_params))
    return [
        algorithm.client_update(m.workspace, b, None, m.train.client_data(0), ClientContext(3, 1, 0)).delta
    ]


@pytest.mark.filterwarnings("error")  # torch warns when a schedule steps before the optimiser it wraps
def test_a_custom_loop_with_a_schedule_and_later_hooks_equals_the_declarative_path() -> None:
    seen: list[int] = []

    def scheduled(model: nn.Module, data: ArrayDataset, ctx: TrainContext, hook: bool = False) -> None:
        opt = ctx.optimizer()
        if hook:  # a hook of the user's own, registered after fedloom built the optimiser
            opt.register_step_post_hook(lambda o, a, k: seen.append(ctx.num_steps))
        sched = ctx.schedule(opt)
        for xb, yb in ctx.batches():
            opt.zero_grad()
            ctx.loss_fn(model(xb), yb).backward()
            opt.step()
            sched.step()

    def hooked(model: nn.Module, data: ArrayDataset, ctx: TrainContext) -> None:
        scheduled(model, data, ctx, hook=True)

    prox = FedProx(local=LOCAL, mu=0.5)
    declarative = _scheduled(prox, None)[0]
    assert _scheduled(prox, scheduled)[0].equal(declarative)
    assert _scheduled(prox, hooked)[0].equal(declarative)
    assert seen == list(range(1, 11))  # 23 examples, batches of 5, two epochs: 10 steps, each counted first
    plain = _scheduled(FedAvg(local=LOCAL), scheduled)[0]
    assert not plain.equal(declarative)  # the proximal term was applied on the direct path too


def test_an_optimizer_kept_past_its_round_steps_as_plain_torch() -> None:
    kept: list[torch.optim.Optimizer] = []

    def keep(model: nn.Module, data: ArrayDataset, ctx: TrainContext) -> None:
        _loop(model, data, ctx)
        kept.append(ctx.optimizer())

    _update(FedProx(local=LOCAL, mu=0.5), keep, rounds=1)
    opt = kept[0]
    p = opt.param_groups[0]["params"][0]
    p.grad = torch.ones_like(p)
    before = p.detach().clone()
    opt.step()  # the round's context is closed: no proximal term, no count
    assert torch.equal(p.detach(), before - LOCAL.lr * torch.ones_like(p))


def test_an_unattached_optimizer_is_refused_where_the_algorithm_needs_the_hook() -> None:
    def manual(model: nn.Module, data: ArrayDataset, ctx: TrainContext) -> None:
        opt = torch.optim.SGD(model.parameters(), lr=ctx.lr)  # built by hand, never attached
        for xb, yb in ctx.batches():
            opt.zero_grad()
            ctx.loss_fn(model(xb), yb).backward()
            opt.step()

    _update(FedAvg(local=LOCAL), manual, rounds=1)  # FedAvg needs no hook
    with pytest.raises(TrainingError, match=r"FedProx's proximal term .* ctx\.attach"):
        _update(FedProx(local=LOCAL, mu=0.5), manual, rounds=1)


# --- bad tasks ------------------------------------------------------------------------------------


def _task(**over: object) -> Task:
    fields: dict[str, object] = {
        "model": lambda: nn.Linear(5, 3),
        "data": ClientData(train=[_classification_data(1)], test=_classification_data(2)),
        "name": "bad",
    }
    fields.update(over)
    return Task(**fields)  # type: ignore[arg-type]


def test_bad_tasks_fail_early_naming_the_task_and_the_problem() -> None:
    def boom() -> nn.Module:
        raise RuntimeError("no weights file")

    cases = [
        (_task(model=boom), "its model factory raised RuntimeError: no weights file"),
        (_task(model=lambda: nn.Linear(7, 3)), "the model failed on a batch of client 0's training data"),
        (_task(loss=lambda out, y: (out - 0).sum(dim=1)), "the loss returned (4,); it must return a scalar"),
        (_task(metrics={"broken": lambda out, y: 1 / 0}), "metric 'broken' failed"),
        (_task(data=lambda: [1, 2]), "data must be a fedloom.CentralData or fedloom.ClientData"),
    ]
    for task, message in cases:
        with pytest.raises(TaskError) as info:
            materialise(task, seed=0, split=PartitionSpec())
        assert "task 'bad'" in str(info.value)
        assert message in str(info.value)


def test_a_label_partition_of_regression_targets_is_refused() -> None:
    task = _task(data=CentralData(train=ArrayDataset(X, Y)), loss=_mse)
    with pytest.raises(TaskError, match="partition 'dirichlet' splits by class label"):
        materialise(
            task, seed=0, split=PartitionSpec(scheme="dirichlet", num_clients=2, options={"alpha": 1.0})
        )


# --- optimiser state kept in the client's state ------------------------------------------------


def test_kept_momentum_continues_across_rounds_and_fresh_momentum_restarts(tmp_path: Path) -> None:
    settings = {**SETTINGS, "rounds": 2}
    kept = LocalOptimizer(torch.optim.SGD, {"momentum": 0.9}, keep_state=True)
    fresh = LocalOptimizer(torch.optim.SGD, {"momentum": 0.9})
    h_kept = fedloom.simulate(_one_client_task(kept), settings, out=tmp_path / "kept", progress=False)
    h_fresh = fedloom.simulate(_one_client_task(fresh), settings, out=tmp_path / "fresh", progress=False)
    # One client and FedAvg with server lr 1: round 2 starts where round 1 ended, so keeping the
    # buffer is six uninterrupted momentum steps.
    np.testing.assert_allclose(_final(h_kept), _hand_momentum(6, 0.1, 0.9, 0.0), rtol=1e-6, atol=1e-7)
    w, b = _hand_momentum(3, 0.1, 0.9, 0.0)[:2], _hand_momentum(3, 0.1, 0.9, 0.0)[2]
    bw, bb = np.zeros(2), 0.0
    for t in range(3):  # round 2 with a fresh buffer
        gw, gb = _grad(w, b)
        bw, bb = (gw, gb) if t == 0 else (0.9 * bw + gw, 0.9 * bb + gb)
        w, b = w - 0.1 * bw, b - 0.1 * bb
    np.testing.assert_allclose(_final(h_fresh), np.append(w, b), rtol=1e-6, atol=1e-7)


class _StopAfterRound1:
    def on_start(self, first_round: int, rounds: int, info: Mapping[str, object]) -> None:
        pass

    def on_round(self, metrics: Mapping[str, object]) -> None:
        raise KeyboardInterrupt  # a stop right after round 1 is committed

    def on_failure(self, failure: object, round: int) -> None:
        pass


def test_kept_adam_state_survives_resume_bit_identically(tmp_path: Path) -> None:
    from fedloom.config.loader import apply_overrides, parse_config
    from fedloom.run import _override
    from fedloom.sim.build import build_components
    from fedloom.sim.runner import run_simulation

    task = _one_client_task(LocalOptimizer(torch.optim.Adam, keep_state=True))
    cfg = parse_config(apply_overrides({}, [_override(k, v) for k, v in {**SETTINGS, "rounds": 3}.items()]))
    whole = run_simulation(cfg, tmp_path / "whole", components=build_components(cfg, task=task)).state.params
    with pytest.raises(KeyboardInterrupt):
        run_simulation(
            cfg, tmp_path / "cut", components=build_components(cfg, task=task), listener=_StopAfterRound1()
        )
    resumed = run_simulation(cfg, tmp_path / "cut", resume=True, components=build_components(cfg, task=task))
    assert resumed.state.params.equal(whole)
    fresh_task = _one_client_task(LocalOptimizer(torch.optim.Adam))
    fresh = run_simulation(cfg, tmp_path / "fresh", components=build_components(cfg, task=fresh_task))
    assert not fresh.state.params.equal(whole)  # the kept state is what resume had to restore


def test_a_metric_that_fails_mid_run_stops_it_naming_the_metric_and_keeps_what_was_recorded(
    tmp_path: Path,
) -> None:
    calls = {"n": 0}

    def flaky(out: torch.Tensor, y: torch.Tensor) -> float:
        calls["n"] += 1
        if calls["n"] > 3:  # two probe calls at materialisation, round 1's evaluation, then it breaks
            raise ValueError("lost the labels")
        return 0.0

    task = _one_client_task(LocalOptimizer(torch.optim.SGD))
    task = Task(model=task.model, data=task.data, loss=task.loss, metrics={"flaky": flaky}, name="flaky-task")
    with pytest.raises(TaskError, match=r"metric 'flaky' failed .*ValueError: lost the labels"):
        fedloom.simulate(task, {**SETTINGS, "rounds": 3}, out=tmp_path / "run", progress=False)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    assert '"round": 1' in lines[0]
    from fedloom.results.store import RunStore

    with RunStore(tmp_path / "run" / "state.sqlite", create=False) as store:
        assert store.latest_round() == 1
        assert store.get_meta("status") == "failed"


def test_a_rounds_optimiser_and_its_state_go_with_the_round() -> None:
    # The step fedloom binds to an optimiser refers back to it; the round's end must undo that, or
    # every client's optimiser state would wait for the garbage collector instead of being freed.
    refs: list[weakref.ref[torch.optim.Optimizer]] = []

    def loop(model: nn.Module, data: ArrayDataset, ctx: TrainContext) -> Mapping[str, float]:
        result = _loop(model, data, ctx)
        refs.append(weakref.ref(ctx.optimizer()))
        return result

    gc.disable()
    try:
        _update(FedAvg(local=LOCAL), loop, rounds=1)
        assert refs
        assert refs[0]() is None
    finally:
        gc.enable()
