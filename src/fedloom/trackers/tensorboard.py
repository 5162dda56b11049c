"""TensorBoard event files from a run's events (the ``tensorboard`` extra)."""

from __future__ import annotations

from pathlib import Path

from fedloom.core.errors import ConfigError
from fedloom.engine.events import EpsilonSpent, Event, RoundCommitted, RunStopped
from fedloom.trackers.scalars import round_scalars

__all__ = ["TensorBoardTracker"]


class TensorBoardTracker:
    """Writes each committed round's metrics to TensorBoard event files in ``logdir``.

    Every value of :func:`~fedloom.trackers.scalars.round_scalars` is a float64 scalar
    (TensorBoard's tensor form, so it reads back bit for bit) at step = round, with the
    event's wall time; ``privacy/epsilon_budget`` is logged with each epsilon. Events
    are flushed after every round, so ``tensorboard --logdir`` shows a run as it goes.
    """

    def __init__(self, logdir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ConfigError(
                [
                    f"tracking.tensorboard = true needs the 'tensorboard' extra: pip install 'fedloom[tensorboard]' ({exc})"
                ]
            ) from None
        logdir.mkdir(parents=True, exist_ok=True)
        self.logdir = logdir
        self._writer = SummaryWriter(str(logdir))

    def _scalar(self, name: str, value: float, step: int, walltime: float) -> None:
        self._writer.add_scalar(name, value, step, walltime, new_style=True, double_precision=True)

    def __call__(self, event: Event) -> None:
        if isinstance(event, RoundCommitted):
            for name, value in round_scalars(event.metrics).items():
                self._scalar(name, value, event.round, event.time)
            self._writer.flush()
        elif isinstance(event, EpsilonSpent) and event.budget > 0:
            self._scalar("privacy/epsilon_budget", event.budget, event.round, event.time)
        elif isinstance(event, RunStopped):
            self._writer.flush()

    def close(self) -> None:
        self._writer.close()
