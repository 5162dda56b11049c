"""A client whose own code raises fails alone: the run goes on and counts it in ``num_failed``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from fedloom.config import load_config
from fedloom.config.schema import ExperimentConfig
from fedloom.core.params import Params
from fedloom.data.datasets import ArrayDataset
from fedloom.sim.build import Components, build_components
from fedloom.sim.executor import Executor, SequentialExecutor
from fedloom.sim.parallel import ParallelExecutor
from fedloom.sim.runner import run_simulation
from fedloom.sim.vectorized import VectorizedExecutor
from fedloom.tasks import ClientData, Task

MARKER = 999.0
BAD_CLIENTS = (2, 5)
NUM_CLIENTS, PER_CLIENT, ROUNDS = 8, 12, 3


class PickyModel(nn.Module):
    """A linear classifier whose forward pass refuses any batch with a marker feature."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x[:, 0] == MARKER).any()):
            raise ValueError("picky model: marker feature in the batch")
        return self.linear(x)


def _setup() -> tuple[ExperimentConfig, Components]:
    cfg = load_config(
        None,
        (
            f"data.num_clients={NUM_CLIENTS}",
            "sampling.fraction=1.0",
            f"rounds={ROUNDS}",
            "client.batch_size=4",
            "eval.every=1",
            "eval.target_accuracy=0",
        ),
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(NUM_CLIENTS * PER_CLIENT, 4, generator=g)
    y = torch.randint(0, 3, (NUM_CLIENTS * PER_CLIENT,), generator=g)
    for c in BAD_CLIENTS:  # one marked example per bad client: every epoch meets it
        x[c * PER_CLIENT + 7, 0] = MARKER
    clients = [
        ArrayDataset(x[c * PER_CLIENT : (c + 1) * PER_CLIENT], y[c * PER_CLIENT : (c + 1) * PER_CLIENT], 3)
        for c in range(NUM_CLIENTS)
    ]
    test = ArrayDataset(torch.randn(30, 4, generator=g), torch.randint(0, 3, (30,), generator=g), 3)
    task = Task(model=PickyModel, data=ClientData(train=clients, test=test), name="picky")
    return cfg, build_components(cfg, task=task)


def _run(executor_kind: str, tmp_path: Path) -> tuple[Params, list[dict[str, object]]]:
    cfg, comps = _setup()
    executor: Executor
    if executor_kind == "parallel":
        with ParallelExecutor(comps.workspace, comps.train, comps.pipeline, workers=2) as executor:
            result = run_simulation(cfg, tmp_path / executor_kind, components=comps, executor=executor)
    else:
        if executor_kind == "vectorized":
            executor = VectorizedExecutor(comps.workspace, comps.train, comps.pipeline)
        else:
            executor = SequentialExecutor(comps.workspace, comps.train, comps.pipeline)
        result = run_simulation(cfg, tmp_path / executor_kind, components=comps, executor=executor)
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    return result.state.params, [json.loads(line) for line in lines]


@pytest.mark.parametrize("executor_kind", ["sequential", "parallel", "vectorized"])
def test_a_raising_model_fails_its_clients_not_the_run(
    executor_kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="fedloom"):
        params, metrics = _run(executor_kind, tmp_path)
    rounds = [m for m in metrics if "num_failed" in m]
    assert [m["round"] for m in rounds] == list(range(1, ROUNDS + 1))
    assert all(m["num_failed"] == len(BAD_CLIENTS) for m in rounds)
    assert all(m["num_clients"] == NUM_CLIENTS - len(BAD_CLIENTS) for m in rounds)
    assert params.all_finite()
    if executor_kind != "parallel":  # worker processes log to their own handlers
        warned = [r.getMessage() for r in caplog.records if "client code raised" in r.getMessage()]
        for r in range(1, ROUNDS + 1):
            for c in BAD_CLIENTS:
                line = f"round {r}, client {c}: client code raised ValueError: picky model: marker"
                assert any(w.startswith(line) for w in warned), line


def test_parallel_and_sequential_agree_with_failing_clients(tmp_path: Path) -> None:
    seq, _ = _run("sequential", tmp_path)
    par, _ = _run("parallel", tmp_path)
    assert par.equal(seq)


def test_ray_counts_failing_clients(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    import ray

    from fedloom.sim.ray_executor import RayExecutor

    cfg, comps = _setup()
    seq, _ = _run("sequential", tmp_path)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ex = RayExecutor(comps.workspace, comps.train, comps.pipeline, workers=2)
        try:
            result = run_simulation(cfg, tmp_path / "ray", components=comps, executor=ex)
        finally:
            ex.close()
    finally:
        ray.shutdown()
    metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["num_failed"] for m in metrics if "num_failed" in m] == [len(BAD_CLIENTS)] * ROUNDS
    assert result.state.params.equal(seq)
