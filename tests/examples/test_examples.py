"""Every example runs as a user would run it, and what it reports is checked independently."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tests.conftest import REPO, cli_env, run_cli

from fedloom.core.serde import params_from_bytes

EXAMPLES = REPO / "examples"


def _metrics(run: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_notebook_script_uses_only_the_public_api_and_learns() -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "notebook.py")],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("final test accuracy")
    acc = float(last.split()[3].rstrip(","))
    assert acc > 0.8
    assert "import fedloom" in (EXAMPLES / "notebook.py").read_text()
    assert "fedloom." not in "".join(
        line
        for line in (EXAMPLES / "notebook.py").read_text().splitlines()
        if line.startswith("from fedloom.") and not line.startswith("from fedloom.metrics")
    )


def test_regression_example_reports_per_site_metrics_that_match_an_independent_evaluation(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    exp = EXAMPLES / "regression" / "regression.toml"
    run_cli(
        "simulate", "--config", str(exp), "--set", "rounds=10", "--out", str(run), "--no-report", cwd=tmp_path
    )
    rows = _metrics(run)
    evaluated = [m for m in rows if "site_mse" in m]
    assert [m["round"] for m in evaluated] == [5, 10]
    # Recompute every site's MSE from the saved model and the task's own test splits.
    spec = importlib.util.spec_from_file_location(
        "regression_task_example", EXAMPLES / "regression" / "regression_task.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    task = module.make(num_clients=20, heterogeneity=0.3)
    params = params_from_bytes((run / "model.safetensors").read_bytes())
    w = params["weight"].double().numpy().reshape(-1)
    b = float(params["bias"].double().numpy()[0])
    per_site, sizes = [], []
    for ds in task.data.client_test:
        pred = ds.x.double().numpy() @ w + b
        per_site.append(float(np.mean((pred - ds.y.double().numpy()) ** 2)))
        sizes.append(len(ds))
    last = evaluated[-1]
    zero_mse = np.average(
        [float(np.mean(ds.y.double().numpy() ** 2)) for ds in task.data.client_test], weights=sizes
    )
    assert float(last["site_mse"]) < 0.2 * zero_mse  # type: ignore[arg-type]  # it learned
    assert last["site_mse"] == pytest.approx(np.average(per_site, weights=sizes), rel=1e-5)
    assert last["site_mse_min"] == pytest.approx(min(per_site), rel=1e-5)
    assert last["site_mse_max"] == pytest.approx(max(per_site), rel=1e-5)
    assert last["site_mse_median"] == pytest.approx(float(np.median(per_site)), rel=1e-5)
    assert len(last["sites"]) == 20  # type: ignore[arg-type]


@pytest.mark.parametrize("algorithm", ["fedprox", "scaffold"])
def test_custom_loop_example_trains_under_fedprox_and_scaffold(
    tmp_path: Path, algorithm: str, mnist_dir: str
) -> None:
    run = tmp_path / "run"
    exp = EXAMPLES / "custom_loop" / f"{algorithm}.toml"
    sets = [
        "rounds=3", "eval.every=3", f"task_args.data_dir={json.dumps(mnist_dir)}", "task_args.train_subset=6000",
        "task_args.test_subset=2000", "data.num_clients=20", "sampling.fraction=0.25",
    ]  # fmt: skip
    run_cli(
        "simulate",
        "--config",
        str(exp),
        *[a for s in sets for a in ("--set", s)],
        "--out",
        str(run),
        "--no-report",
        cwd=tmp_path,
    )
    last = _metrics(run)[-1]
    assert last["round"] == 3
    assert float(last["test_accuracy"]) > 0.3  # type: ignore[arg-type]
    assert "test_f1" in last


def test_scaffold_option_two_is_refused_with_a_non_sgd_optimizer(tmp_path: Path, mnist_dir: str) -> None:
    exp = EXAMPLES / "custom_loop" / "scaffold.toml"
    proc = run_cli(
        "simulate", "--config", str(exp), "--set", "algorithm.scaffold_option='II'",
        "--set", f"task_args.data_dir={json.dumps(mnist_dir)}", "--out", str(tmp_path / "run"),
        cwd=tmp_path, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "use algorithm.scaffold_option = 'I'" in " ".join(proc.stderr.split())
