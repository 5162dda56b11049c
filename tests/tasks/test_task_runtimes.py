"""A user's task by import path runs the same in every simulation runtime, and resumes after SIGKILL."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from tests.conftest import cli_env, fedloom_cmd, run_cli

from fedloom.config import load_config
from fedloom.config.schema import ExperimentConfig
from fedloom.core.params import Params
from fedloom.core.serde import params_from_bytes
from fedloom.sim.build import build_components
from fedloom.sim.executor import Executor, SequentialExecutor
from fedloom.sim.parallel import ParallelExecutor
from fedloom.sim.runner import run_simulation

HERE = Path(__file__).resolve().parent
EXPERIMENT = """
seed = 7
rounds = {rounds}
executor = "sequential"
task = "regression_task:make"
[task_args]
num_clients = 6
seed = 1
fail_client = {fail}
[algorithm]
name = "{algorithm}"
scaffold_option = "I"  # option II assumes plain SGD; this task uses Adam
[client]
lr = 0.05
epochs = 2
batch_size = 4
[sampling]
fraction = {fraction}
[data]
num_clients = 6
[eval]
target_accuracy = 0.0
"""


def _experiment(
    folder: Path, *, rounds: int = 3, algorithm: str = "fedprox", fail: int = -1, fraction: float = 0.5
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(HERE / "regression_task.py", folder / "regression_task.py")
    path = folder / "exp.toml"
    path.write_text(
        EXPERIMENT.format(rounds=rounds, algorithm=algorithm, fail=fail, fraction=fraction), encoding="utf-8"
    )
    return path


def _run(cfg: ExperimentConfig, folder: Path, make_executor: object, out: Path) -> Params:
    comps = build_components(cfg, search=[folder])
    executor: Executor = make_executor(comps)  # type: ignore[operator]
    try:
        return run_simulation(cfg, out, components=comps, executor=executor).state.params
    finally:
        close = getattr(executor, "close", None)
        if close is not None:
            close()


def test_custom_task_is_bit_identical_on_sequential_parallel_and_ray(tmp_path: Path) -> None:
    # SCAFFOLD: the custom loop's corrections and the clients' states both cross the workers.
    exp = _experiment(tmp_path / "exp", algorithm="scaffold")
    cfg = load_config(exp)
    folder = exp.parent
    want = _run(cfg, folder, lambda c: SequentialExecutor(c.workspace, c.train, c.pipeline), tmp_path / "seq")
    for workers in (1, 2, 3):
        got = _run(
            cfg,
            folder,
            lambda c, w=workers: ParallelExecutor(c.workspace, c.train, c.pipeline, workers=w),
            tmp_path / f"par{workers}",
        )
        assert got.equal(want), f"parallel with {workers} workers differs"
    pytest.importorskip("ray")
    import ray

    from fedloom.sim.ray_executor import RayExecutor

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        got = _run(
            cfg, folder, lambda c: RayExecutor(c.workspace, c.train, c.pipeline, workers=2), tmp_path / "ray"
        )
    finally:
        ray.shutdown()
    assert got.equal(want)


def test_custom_task_metrics_are_recorded_and_a_raising_client_is_a_failure(tmp_path: Path) -> None:
    exp = _experiment(tmp_path / "exp", rounds=2, fail=2, fraction=1.0)
    cfg = load_config(exp)
    result = run_simulation(cfg, tmp_path / "run", components=build_components(cfg, search=[exp.parent]))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == [1, 2]
    for m in lines:
        assert (m["num_clients"], m["num_failed"]) == (5, 1)  # client 2's exception failed only client 2
        assert {"test_mse", "test_mae", "test_loss"} <= set(m)
        assert m["test_mse"] == pytest.approx(m["test_loss"], rel=1e-6)  # the loss is the MSE
    assert result.final_metrics["test_mse"] == lines[-1]["test_mse"]


def test_task_module_next_to_the_experiment_resumes_bit_identically_after_sigkill(tmp_path: Path) -> None:
    exp = _experiment(tmp_path / "exp", rounds=12, algorithm="scaffold")
    run_cli("simulate", "--config", str(exp), "--out", str(tmp_path / "whole"), "--no-report", cwd=tmp_path)
    whole = params_from_bytes((tmp_path / "whole" / "model.safetensors").read_bytes())

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        fedloom_cmd("simulate", "--config", str(exp), "--out", str(run_dir), "--no-report"),
        cwd=exp.parent,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(metrics.read_text().splitlines())
    assert 3 <= done < 12
    run_cli("simulate", "--resume", str(run_dir), "--no-report", cwd=exp.parent)
    resumed = params_from_bytes((run_dir / "model.safetensors").read_bytes())
    assert resumed.equal(whole)


def test_a_missing_task_module_says_what_was_searched(tmp_path: Path) -> None:
    exp = tmp_path / "exp.toml"
    exp.write_text('task = "no_such_module:make"\n', encoding="utf-8")
    proc = run_cli(
        "simulate", "--config", str(exp), "--out", str(tmp_path / "run"), cwd=tmp_path, check=False
    )
    assert proc.returncode == 2
    err = " ".join(proc.stderr.split())
    assert "no module named 'no_such_module'" in err
    assert str(tmp_path.resolve()) in err
    assert "next to the experiment file" in err
