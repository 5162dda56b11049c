"""TensorBoard and MLflow trackers of a real simulation hold exactly the values of metrics.jsonl."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

from fedloom.config import load_config
from fedloom.core.errors import ConfigError
from fedloom.sim.runner import run_simulation

HOSPITALS = ("cleveland", "hungarian", "switzerland", "va")


def _overrides(rounds: int) -> list[str]:
    return [
        "data.dataset=heart_disease",
        "data.num_clients=4",
        f"rounds={rounds}",
        "sampling.fraction=0.5",
        "executor=sequential",
        "seed=3",
        "privacy.mode=central",
        "privacy.noise_multiplier=0.8",
        "tracking.tensorboard=true",
        "tracking.mlflow=true",
        "tracking.mlflow_experiment=heart",
    ]


def _expected(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every finite number of metrics.jsonl by tag: top-level keys as they are, sites/<site>/<metric>."""
    out: dict[str, list[tuple[int, float]]] = {}
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        row: dict[str, Any] = json.loads(line)
        r = row.pop("round")
        flat = {k: v for k, v in row.items() if k != "sites"}
        for site, values in row["sites"].items():
            flat.update({f"sites/{site}/{k}": v for k, v in values.items()})
        for k, v in flat.items():
            if isinstance(v, int | float) and math.isfinite(v):
                out.setdefault(k, []).append((r, float(v)))
    return out


def _tensorboard(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    acc = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    acc.Reload()
    return {
        tag: [(e.step, float(tensor_util.make_ndarray(e.tensor_proto).item())) for e in acc.Tensors(tag)]
        for tag in acc.Tags()["tensors"]
    }


def _mlflow(run_dir: Path) -> tuple[Any, dict[str, list[tuple[int, float]]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    (exp,) = [e for e in client.search_experiments() if e.name == "heart"]
    (run,) = client.search_runs([exp.experiment_id])
    assert (run_dir / "mlflow_run_id").read_text().strip() == run.info.run_id
    history = {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        for key in run.data.metrics
    }
    return run, history


def test_trackers_read_back_equal_metrics_jsonl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the reader needs it as the writer does
    run_dir = tmp_path / "run"
    run_simulation(load_config(None, _overrides(3)), run_dir)
    expected = _expected(run_dir)
    for key in ("test_accuracy", "test_loss", "train_loss", "epsilon", "sites/cleveland/accuracy"):
        assert [r for r, _ in expected[key]] == [1, 2, 3]
    # switzerland's AUC is undefined (one class): NaN in metrics.jsonl, absent in the trackers.
    assert "sites/switzerland/auc" not in expected

    assert _tensorboard(run_dir / "tensorboard") == expected
    run, history = _mlflow(run_dir)
    assert history == expected
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "run"
    assert run.data.params["data.dataset"] == "heart_disease"
    assert run.data.params["privacy.noise_multiplier"] == "0.8"
    assert run.data.tags["fedloom.runtime"] == "simulation"

    # A resumed run logs on into the same MLflow run and the same TensorBoard directory.
    run_simulation(load_config(None, _overrides(4)), run_dir, resume=True)
    expected = _expected(run_dir)
    assert [r for r, _ in expected["test_accuracy"]] == [1, 2, 3, 4]
    assert _tensorboard(run_dir / "tensorboard") == expected
    run, history = _mlflow(run_dir)
    assert history == expected
    assert run.info.status == "FINISHED"


def test_a_missing_extra_names_its_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import mlflow` fail as if it were not installed.
    for module in ("mlflow", "tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, module, None)
    cfg = load_config(None, _overrides(1))
    with pytest.raises(ConfigError) as err:
        run_simulation(cfg, tmp_path / "run")
    assert "pip install 'fedloom[tensorboard]'" in str(err.value)
    assert "pip install 'fedloom[mlflow]'" in str(err.value)
    assert not (tmp_path / "run").exists()  # refused before any data was loaded or file written


def test_a_resumed_run_may_switch_a_tracker_on(tmp_path: Path) -> None:
    """Trackers only watch: a resumption that turns one on keeps the run's configuration otherwise."""
    plain = [o for o in _overrides(1) if not o.startswith("tracking.")]
    run_dir = tmp_path / "run"
    run_simulation(load_config(None, plain), run_dir)
    assert not (run_dir / "tensorboard").exists()
    cfg = load_config(None, [*_overrides(2)[:2], "rounds=2", *plain[3:], "tracking.tensorboard=true"])
    run_simulation(cfg, run_dir, resume=True)
    logged = _tensorboard(run_dir / "tensorboard")
    assert logged["test_accuracy"] == [e for e in _expected(run_dir)["test_accuracy"] if e[0] == 2]
