"""An MLflow run from a run's events (the ``mlflow`` extra)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from fedloom.config.schema import ExperimentConfig
from fedloom.core.errors import ConfigError
from fedloom.engine.events import EpsilonSpent, Event, RoundCommitted, RunStarted, RunStopped
from fedloom.trackers.scalars import round_scalars

if TYPE_CHECKING:
    from mlflow.entities import Metric

__all__ = ["RUN_ID_FILE", "MlflowTracker", "mlflow_uri"]

RUN_ID_FILE = "mlflow_run_id"
_MAX_PARAMS, _MAX_METRICS = 100, 1000  # MLflow's per-request limits of log_batch


def mlflow_uri(cfg: ExperimentConfig, run_dir: Path) -> str:
    """The tracking URI a run logs to: ``tracking.mlflow_uri``, or the file store ``<run_dir>/mlruns``."""
    return cfg.tracking.mlflow_uri or (run_dir / "mlruns").resolve().as_uri()


def _params(cfg: ExperimentConfig) -> dict[str, str]:
    out: dict[str, str] = {}

    def walk(prefix: str, obj: Mapping[str, Any]) -> None:
        for k, v in obj.items():
            if isinstance(v, Mapping) and v:
                walk(f"{prefix}{k}.", v)
            else:
                out[f"{prefix}{k}"] = v if isinstance(v, str) else json.dumps(v)

    walk("", cfg.model_dump(mode="json"))
    return out


class MlflowTracker:
    """Logs a run to MLflow: the configuration as parameters, each committed round's metrics.

    Every value of :func:`~fedloom.trackers.scalars.round_scalars` is logged at step =
    round with the event's time, in one batch per round; ``privacy/epsilon_budget`` with
    each epsilon. The MLflow run id is kept in ``<run_dir>/mlflow_run_id``, so a resumed
    run goes on logging into the same MLflow run. The run ends FINISHED or FAILED with
    the fedloom run, KILLED if it is closed before it stopped.

    Notes
    -----
    MLflow keeps its file store behind ``MLFLOW_ALLOW_FILE_STORE=true``; for a ``file:``
    (or scheme-less) URI this sets that variable in the process environment unless it is
    already set, since the file store is what the ``[tracking]`` section promises.
    """

    def __init__(self, cfg: ExperimentConfig, run_dir: Path) -> None:
        uri = mlflow_uri(cfg, run_dir)
        if urlparse(uri).scheme in ("", "file"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            from mlflow.entities import Metric
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise ConfigError(
                [f"tracking.mlflow = true needs the 'mlflow' extra: pip install 'fedloom[mlflow]' ({exc})"]
            ) from None
        self._metric = Metric
        self.uri = uri
        try:
            self._client = MlflowClient(tracking_uri=uri)
            id_file = run_dir / RUN_ID_FILE
            if id_file.exists():
                self.run_id = id_file.read_text(encoding="utf-8").strip()
                self._client.update_run(self.run_id, status="RUNNING")
            else:
                name = cfg.tracking.mlflow_experiment
                exp = self._client.get_experiment_by_name(name)
                exp_id = exp.experiment_id if exp is not None else self._client.create_experiment(name)
                run = self._client.create_run(exp_id, run_name=cfg.tracking.run_name or run_dir.name)
                self.run_id = run.info.run_id
                id_file.write_text(self.run_id + "\n", encoding="utf-8")
                from mlflow.entities import Param

                params = [Param(k, v) for k, v in _params(cfg).items()]
                for i in range(0, len(params), _MAX_PARAMS):
                    self._client.log_batch(self.run_id, params=params[i : i + _MAX_PARAMS])
        except MlflowException as exc:
            raise ConfigError([f"tracking.mlflow: MLflow at {uri} refused the run: {exc}"]) from None
        self._open = True

    def _log(self, metrics: list[Metric]) -> None:
        for i in range(0, len(metrics), _MAX_METRICS):
            self._client.log_batch(self.run_id, metrics=metrics[i : i + _MAX_METRICS])

    def __call__(self, event: Event) -> None:
        ms = int(event.time * 1000)
        if isinstance(event, RoundCommitted):
            scalars = round_scalars(event.metrics)
            self._log([self._metric(k, v, ms, event.round) for k, v in scalars.items()])
        elif isinstance(event, EpsilonSpent) and event.budget > 0:
            self._log([self._metric("privacy/epsilon_budget", event.budget, ms, event.round)])
        elif isinstance(event, RunStarted):
            self._client.set_tag(self.run_id, "fedloom.runtime", event.runtime)
        elif isinstance(event, RunStopped):
            self._client.set_tag(self.run_id, "fedloom.stop_reason", event.reason[:5000])
            self._client.set_terminated(self.run_id, status="FAILED" if event.failed else "FINISHED")
            self._open = False

    def close(self) -> None:
        if self._open:
            self._client.set_terminated(self.run_id, status="KILLED")
            self._open = False
