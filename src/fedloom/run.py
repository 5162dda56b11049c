"""``fedloom.simulate``: a whole simulated experiment from Python, for notebooks and scripts.

    import fedloom
    history = fedloom.simulate(my_task, {"rounds": 20, "algorithm.name": "fedprox"})
    history.metric("test_accuracy")   # one value per evaluated round

It runs exactly what ``fedloom simulate`` runs (same config schema, executors,
run directory, determinism), with a task object given in Python instead of an
import path.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from fedloom.config.loader import apply_overrides, load_config, parse_config
from fedloom.config.schema import ExperimentConfig
from fedloom.core.params import Params
from fedloom.sim.build import build_components
from fedloom.sim.runner import METRICS, run_simulation
from fedloom.tasks.task import Task

__all__ = ["History", "simulate"]


@dataclass(frozen=True)
class History:
    """A finished run: one metrics dict per round, the final parameters, where it was written."""

    rounds: tuple[Mapping[str, Any], ...]
    run_dir: Path
    stop_reason: str
    final_params: Params

    def metric(self, key: str) -> list[tuple[int, float]]:
        """``(round, value)`` for every round that reported ``key``."""
        return [(int(m["round"]), float(m[key])) for m in self.rounds if m.get(key) is not None]

    @property
    def final(self) -> Mapping[str, Any]:
        """The last round's metrics."""
        return self.rounds[-1] if self.rounds else {}


def _override(key: str, value: Any) -> str:
    import tomli_w

    text = tomli_w.dumps({"v": value}).strip()
    return f"{key}={text.removeprefix('v = ')}"


def simulate(
    task: Task | None = None,
    settings: Mapping[str, Any] | None = None,
    *,
    config: str | Path | ExperimentConfig | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    search: Sequence[Path] = (),
) -> History:
    """Run a simulation of ``task`` and return its history.

    Args:
        task: the job; ``None`` uses the experiment's own (``config.task`` or the built-in MNIST).
        settings: dotted experiment keys and values, e.g. ``{"rounds": 20, "client.lr": 0.1}``,
            applied over ``config`` (a file, a validated config, or the embedded defaults).
        out: the run directory to create; ``None`` uses a fresh temporary directory.
        progress: print one line per round.
        search: directories to import ``config.task``'s module from.
    """
    overrides = [_override(k, v) for k, v in dict(settings or {}).items()]
    if isinstance(config, ExperimentConfig):
        cfg = parse_config(apply_overrides(config.model_dump(), overrides))
    else:
        cfg = load_config(config, overrides)
    run_dir = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="fedloom-"))
    if out is None:
        run_dir = run_dir / "run"
    comps = build_components(cfg, task=task, search=search)
    listener = None
    if progress:
        from fedloom.cli.progress import ConsoleListener

        console = Console(highlight=False, soft_wrap=True)
        listener = ConsoleListener(console)
    try:
        result = run_simulation(cfg, run_dir, listener=listener, components=comps)
    finally:
        if listener is not None:
            listener.close()
    lines = (run_dir / METRICS).read_text(encoding="utf-8").splitlines()
    rounds = tuple(json.loads(line) for line in lines if line.strip())
    return History(
        rounds=rounds,
        run_dir=run_dir,
        stop_reason=result.stop_reason,
        final_params=result.state.params,
    )
