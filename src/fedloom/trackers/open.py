"""Build the trackers an experiment's ``[tracking]`` section asks for."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Protocol

from fedloom.config.schema import ExperimentConfig
from fedloom.core.errors import ConfigError
from fedloom.engine.events import Event

__all__ = ["Tracker", "check_tracking_extras", "open_trackers"]


class Tracker(Protocol):
    """An observer of a run's events that holds files or a remote run open until :meth:`close`."""

    def __call__(self, event: Event) -> None: ...

    def close(self) -> None: ...


# (config key, module that must import, extra that provides it)
_EXTRAS = (("tensorboard", "tensorboard", "tensorboard"), ("mlflow", "mlflow", "mlflow"))


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules holds None for it
        return False


def check_tracking_extras(cfg: ExperimentConfig) -> None:
    """Raise :class:`ConfigError` naming the ``pip install`` command of each enabled tracker's missing extra."""
    problems = [
        f"tracking.{key} = true needs the '{extra}' extra: pip install 'fedloom[{extra}]'"
        for key, module, extra in _EXTRAS
        if getattr(cfg.tracking, key) and not _importable(module)
    ]
    if problems:
        raise ConfigError(problems)


def open_trackers(cfg: ExperimentConfig, run_dir: Path) -> list[Tracker]:
    """The trackers ``cfg.tracking`` enables for the run in ``run_dir`` (none by default).

    Subscribe each to the run's event bus and :meth:`~Tracker.close` it when the run ends.
    """
    check_tracking_extras(cfg)
    t = cfg.tracking
    trackers: list[Tracker] = []
    if t.tensorboard:
        from fedloom.trackers.tensorboard import TensorBoardTracker

        trackers.append(
            TensorBoardTracker(Path(t.tensorboard_dir) if t.tensorboard_dir else run_dir / "tensorboard")
        )
    if t.mlflow:
        from fedloom.trackers.mlflow import MlflowTracker

        try:
            trackers.append(MlflowTracker(cfg, run_dir))
        except BaseException:
            for tr in trackers:
                tr.close()
            raise
    return trackers
