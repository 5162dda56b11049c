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

from fedloom.results.run_data import RoundActivity

__all__ = [
    "PlotRun",
    "plot_accuracy",
    "plot_bytes",
    "plot_loss",
    "plot_participation",
    "plot_privacy",
    "plot_site_curves",
    "plot_site_distribution",
]


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
    """Test accuracy against round, runs overlaid (the sites' weighted accuracy dashed, where recorded),
    a dashed line at each target above 0."""
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
    for run in runs:  # where the sites evaluated on their own test splits: their weighted mean
        xs, ys = _series(run.rows, "site_accuracy")
        if xs:
            ax.plot(xs, ys, linestyle="--", marker="o" if len(xs) <= 50 else None, markersize=3,
                    label=f"{run.label} (sites)")  # fmt: skip
            ax.legend(fontsize="small")
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


def _round_axis(ax: Axes, title: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(visible=True, alpha=0.3)


#: Above this many sites the per-site plot draws no legend (and no markers).
_MAX_LEGEND = 20


def plot_site_curves(rows: Sequence[Mapping[str, object]], metric: str, path: Path) -> None:
    """Each site's ``metric`` on its own test split against round (one line per site; ``sites`` rows)."""
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for row in rows:
        sites = row.get("sites")
        if not isinstance(sites, Mapping):
            continue
        rnd = int(_number(row, "round") or 0)
        for site, values in sites.items():
            if isinstance(values, Mapping) and (v := _number(values, metric)) is not None:
                xs, ys = curves.setdefault(str(site), ([], []))
                xs.append(rnd)
                ys.append(v)
    fig = _new_figure(7.0, 4.5)
    ax = fig.add_subplot()
    many = len(curves) > _MAX_LEGEND
    for site, (xs, ys) in curves.items():
        if many:  # a cloud of thin lines; the distribution plot summarises them
            ax.plot(xs, ys, linewidth=0.6, alpha=0.4)
        else:
            ax.plot(xs, ys, marker="o" if len(xs) <= 50 else None, markersize=3, label=site)
    _round_axis(ax, f"Per-site {metric} on each site's own test split ({len(curves)} sites)", metric)
    if curves and not many:
        ax.legend(fontsize="small")
    fig.savefig(path)


def plot_site_distribution(rows: Sequence[Mapping[str, object]], metric: str, path: Path) -> None:
    """Across sites, per round: the min-max band, the 10th percentile, the median and the weighted mean."""
    fig = _new_figure(7.0, 4.5)
    ax = fig.add_subplot()
    xs_lo, lo = _series(rows, f"site_{metric}_min")
    xs_hi, hi = _series(rows, f"site_{metric}_max")
    if xs_lo and xs_lo == xs_hi:
        ax.fill_between(xs_lo, lo, hi, alpha=0.2, label="min to max")
    for key, label, style in (
        (f"site_{metric}_p10", "10th percentile", ":"),
        (f"site_{metric}_median", "median", "-"),
        (f"site_{metric}", "example-weighted mean", "--"),
    ):
        xs, ys = _series(rows, key)
        if xs:
            ax.plot(xs, ys, linestyle=style, marker="o" if len(xs) <= 50 else None, markersize=3, label=label)
    _round_axis(ax, f"{metric} across sites", metric)
    ax.legend(fontsize="small")
    fig.savefig(path)


def plot_privacy(epsilon: Sequence[tuple[int, float]], budget: float, path: Path) -> None:
    """Epsilon spent after each round, with the budget (when there is one) as a dashed line."""
    fig = _new_figure(7.0, 4.5)
    ax = fig.add_subplot()
    ax.plot([r for r, _ in epsilon], [e for _, e in epsilon], marker="o" if len(epsilon) <= 50 else None,
            markersize=3, label="epsilon spent")  # fmt: skip
    if budget > 0:
        ax.axhline(budget, linestyle="--", color="grey", linewidth=1, label=f"budget {budget:g}")
    _round_axis(ax, "Privacy spent", "epsilon")
    ax.legend(fontsize="small")
    fig.savefig(path)


def plot_participation(activity: Sequence[RoundActivity], path: Path) -> None:
    """Per round: accepted, rejected and dropped clients as stacked bars."""
    fig = _new_figure(7.0, 4.5)
    ax = fig.add_subplot()
    rounds = [a.round for a in activity]
    accepted = [len(a.accepted) for a in activity]
    rejected = [len(a.rejected) for a in activity]
    dropped = [len(a.dropped) for a in activity]
    ax.bar(rounds, accepted, label="accepted", color="tab:green")
    ax.bar(rounds, rejected, bottom=accepted, label="rejected", color="tab:red")
    ax.bar(rounds, dropped, bottom=[a + r for a, r in zip(accepted, rejected, strict=True)], label="dropped",
           color="tab:orange")  # fmt: skip
    _round_axis(ax, "Clients per round", "clients")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize="small")
    fig.savefig(path)


def plot_bytes(activity: Sequence[RoundActivity], path: Path) -> None:
    """Bytes on the wire per round: down (broadcasts) and up (updates), side by side."""
    fig = _new_figure(7.0, 4.5)
    ax = fig.add_subplot()
    for offset, attr, label in ((-0.2, "bytes_down", "down"), (0.2, "bytes_up", "up")):
        pairs = [(a.round, v) for a in activity if (v := getattr(a, attr)) is not None]
        if pairs:
            ax.bar([r + offset for r, _ in pairs], [v for _, v in pairs], width=0.4, label=label)
    _round_axis(ax, "Bytes per round", "bytes")
    ax.legend(fontsize="small")
    fig.savefig(path)
