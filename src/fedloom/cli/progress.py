"""Round progress: a rich progress bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from fedloom.sim.executor import ClientFailure

__all__ = ["ConsoleListener"]


def _loss(metrics: Mapping[str, Any]) -> str:
    loss = metrics.get("train_loss")
    return "-" if loss is None else f"{loss:.4f}"  # None: nobody trained (an empty Poisson cohort)


_DISTRIBUTION = ("_min", "_p10", "_median", "_max")


def _fmt(metrics: Mapping[str, Any]) -> str:
    parts = [f"round {metrics['round']}", f"train_loss {_loss(metrics)}"]
    for key, value in metrics.items():
        shown = key.startswith("test_") or (key.startswith("site_") and not key.endswith(_DISTRIBUTION))
        if shown and isinstance(value, float):
            parts.append(f"{key.replace('accuracy', 'acc')} {value:.4f}")
    parts.append(f"clients {metrics['num_clients']}")
    parts.append(f"{metrics['seconds']:.2f}s")
    return "  ".join(parts)


class ConsoleListener:
    """Implements :class:`fedloom.sim.runner.RoundListener` for the CLI."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live = console.is_terminal
        self._progress: Progress | None = None
        self._task: Any = None
        self._rounds = 0
        self._t0 = time.perf_counter()

    def on_start(self, first_round: int, rounds: int, info: Mapping[str, Any]) -> None:
        self._rounds = rounds
        self.console.print(
            f"data: {info.get('data')}  run: {info.get('run_dir')}  rounds {first_round}..{rounds}",
            markup=False,
            emoji=False,
        )
        if self.live:
            self._progress = Progress(
                TextColumn("round {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("{task.fields[acc]}  {task.fields[loss]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._progress.start()
            self._task = self._progress.add_task(
                "rounds", total=rounds, completed=first_round - 1, acc="", loss=""
            )

    def on_round(self, metrics: Mapping[str, Any]) -> None:
        if self._progress is not None:
            acc = f"acc {metrics['test_accuracy']:.4f}" if "test_accuracy" in metrics else ""
            self._progress.update(
                self._task, completed=metrics["round"], acc=acc, loss=f"loss {_loss(metrics)}"
            )
        else:
            self.console.print(_fmt(metrics), markup=False, emoji=False, highlight=False)

    def on_failure(self, failure: ClientFailure, round: int) -> None:
        # A Text, not markup: the reason is arbitrary text (an exception message with brackets).
        self.console.print(
            Text(f"round {round}: client {failure.client_id} failed: {failure.reason}", "yellow")
        )

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
