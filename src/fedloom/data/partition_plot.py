"""Plots of a federated split: a client-by-label heat map and a client-size histogram.

matplotlib's object API on an explicit Agg canvas (no pyplot state), so plotting
works headless and never touches a global backend. Each figure is
:data:`FIGSIZE` inches at :data:`DPI`, saved without tight cropping, so every PNG
is exactly ``FIGSIZE * DPI`` pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedloom.core.errors import DataError
from fedloom.data.stats import PartitionStats

__all__ = ["DPI", "FIGSIZE", "HEATMAP_PNG", "SIZES_PNG", "plot_partition"]

#: Width and height of each figure in inches.
FIGSIZE = (8.0, 6.0)
#: Dots per inch; each PNG is ``FIGSIZE * DPI`` = 800 x 600 pixels.
DPI = 100
HEATMAP_PNG = "partition_heatmap.png"
SIZES_PNG = "client_sizes.png"
#: More clients than this are shown as the first ones only in the heat map (rows stay legible).
MAX_HEATMAP_CLIENTS = 200


def _figure() -> Figure:
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_partition(stats: PartitionStats, out_dir: str | Path, *, title: str = "") -> tuple[Path, Path]:
    """Write :data:`HEATMAP_PNG` and :data:`SIZES_PNG` into ``out_dir`` (created if needed).

    The heat map shows each client's label counts (rows: clients, at most
    :data:`MAX_HEATMAP_CLIENTS`; columns: the ``stats.num_classes`` labels);
    the histogram shows how many clients have each size.

    Returns:
        The two paths, heat map first.

    Raises:
        DataError: if ``out_dir`` cannot be created or written.
    """
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the plot directory {out}: {exc}") from exc
    heat, sizes = out / HEATMAP_PNG, out / SIZES_PNG
    hist = stats.histogram[:MAX_HEATMAP_CLIENTS]  # (clients, classes)
    shown = f" (first {MAX_HEATMAP_CLIENTS} clients)" if stats.num_clients > MAX_HEATMAP_CLIENTS else ""

    fig = _figure()
    ax = fig.add_subplot()
    image = ax.imshow(hist, aspect="auto", interpolation="nearest", cmap="viridis")
    fig.colorbar(image, ax=ax, label="examples")
    ax.set_xlabel(f"label ({stats.num_classes} classes)")
    ax.set_ylabel("client")
    ax.set_title(f"{title + ': ' if title else ''}examples per client and label{shown}")
    _save(fig, heat)

    fig = _figure()
    ax = fig.add_subplot()
    client_sizes = stats.histogram.sum(axis=1)
    bins = min(50, max(1, np.unique(client_sizes).size))
    ax.hist(client_sizes, bins=bins, color="tab:blue", edgecolor="white")
    ax.set_xlabel("examples per client")
    ax.set_ylabel("clients")
    ax.set_title(
        f"{title + ': ' if title else ''}{stats.num_clients} clients, {stats.total} examples "
        f"(mean {stats.sizes.mean:.1f}, min {stats.sizes.min:.0f}, max {stats.sizes.max:.0f})"
    )
    _save(fig, sizes)
    return heat, sizes


def _save(fig: Figure, path: Path) -> None:
    try:
        fig.savefig(path, format="png")
    except OSError as exc:
        raise DataError(f"cannot write the plot {path}: {exc}") from exc
