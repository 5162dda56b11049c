"""Plots of per-round metrics, runs overlaid (used by ``fedloom report``).

matplotlib's object API with an explicit Agg canvas: no pyplot state and no global
backend switch is touched, so plotting is safe inside any program.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = ["PlotRun", "plot_accuracy", "plot_loss"]


@dataclass(frozen=True)
class PlotRun:
    """One run to draw: its legend label, its target accuracy (0 = none) and its metric rows."""

    label: str
    target: float
    rows: Sequence[Mapping[str, object]]


def _number(row: Mapping[str, object], key: str) -> float | None:
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _series(rows: Sequence[Mapping[str, object]], key: str) -> tuple[list[int], list[float]]:
    """(rounds, values) of the rows where ``key`` is a number."""
    pairs = [(int(_number(r, "round") or 0), v) for r in rows if (v := _number(r, key)) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself to fig: rendering never goes through pyplot
    return fig


def _plot_metric(ax: Axes, runs: Sequence[PlotRun], key: str, title: str) -> None:
    """Overlay ``key`` against round for every run that logged it."""
    drawn = False
    for run in runs:
        xs, ys = _series(run.rows, key)
        if xs:
            ax.plot(xs, ys, marker="o" if len(xs) <= 50 else None, markersize=3, label=run.label)
            drawn = True
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(visible=True, alpha=0.3)
    if drawn:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, f"no {key} recorded", ha="center", va="center", transform=ax.transAxes)


def plot_accuracy(runs: Sequence[PlotRun], path: Path) -> None:
    """Test accuracy against round, runs overlaid, a dashed line at each target above 0."""
    fig = _new_figure(7.0, 4.5)
    ax = fig.add_subplot()
    for target in sorted({r.target for r in runs if r.target > 0}):
        ax.axhline(target, linestyle="--", color="grey", linewidth=1)
        ax.annotate(
            f"target {target:g}",
            (0.01, target),
            xycoords=("axes fraction", "data"),
            va="bottom",
            fontsize="small",
            color="grey",
        )
    _plot_metric(ax, runs, "test_accuracy", "Test accuracy")
    ax.set_ylabel("accuracy")
    fig.savefig(path)


def plot_loss(runs: Sequence[PlotRun], path: Path) -> None:
    """Train loss (left) and test loss (right) against round, runs overlaid."""
    fig = _new_figure(11.0, 4.5)
    train_ax, test_ax = fig.subplots(1, 2)
    _plot_metric(train_ax, runs, "train_loss", "Train loss")
    _plot_metric(test_ax, runs, "test_loss", "Test loss")
    train_ax.set_ylabel("loss")
    fig.savefig(path)
