"""Summary statistics of a federated split, for ``fedloom partition`` and run logs.

:func:`partition_stats` is pure arithmetic over the per-client label histogram;
:func:`render_partition_stats` and :func:`format_partition_stats` only present it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from rich.console import Console
from rich.table import Table

from fedloom.core.errors import DataError
from fedloom.data.federated import FederatedDataset, PartitionedDataset

__all__ = [
    "ClientStats",
    "PartitionStats",
    "SummaryStats",
    "format_partition_stats",
    "label_histograms",
    "partition_stats",
    "render_partition_stats",
]


@dataclass(frozen=True)
class SummaryStats:
    """min / mean / median / max / standard deviation of one quantity over clients."""

    min: float
    mean: float
    median: float
    max: float
    std: float

    @classmethod
    def of(cls, values: np.ndarray) -> SummaryStats:
        v = np.asarray(values, dtype=np.float64)
        return cls(float(v.min()), float(v.mean()), float(np.median(v)), float(v.max()), float(v.std()))


@dataclass(frozen=True)
class ClientStats:
    """One client's row: size, number of distinct labels, the most common label and its share."""

    cid: int
    size: int
    num_labels: int
    top_label: int
    top_share: float


@dataclass(frozen=True)
class PartitionStats:
    """Statistics of a federated dataset.

    Attributes:
        num_clients: number of clients.
        num_classes: number of histogram columns.
        total: examples over all clients.
        sizes: client sizes.
        labels_per_client: distinct labels per client.
        top_share: per-client share of the most common label (1.0 = one label only).
        histogram: int64 ``(num_clients, num_classes)`` label counts.
        clients: one :class:`ClientStats` per client, in id order.
    """

    num_clients: int
    num_classes: int
    total: int
    sizes: SummaryStats
    labels_per_client: SummaryStats
    top_share: SummaryStats
    histogram: np.ndarray
    clients: tuple[ClientStats, ...]


def label_histograms(
    fed: FederatedDataset, num_classes: int, *, clients: np.ndarray | None = None
) -> np.ndarray:
    """int64 ``(len(clients), num_classes)`` label counts of ``clients`` (default: every client, in id order).

    Fast path for :class:`PartitionedDataset`; other datasets materialise each listed client once.

    Raises:
        DataError: if some client holds a label ``>= num_classes``.
    """
    if clients is None and isinstance(fed, PartitionedDataset):
        return fed.label_histograms(num_classes)
    ids = np.arange(fed.num_clients) if clients is None else np.asarray(clients, dtype=np.int64)
    out = np.zeros((len(ids), num_classes), dtype=np.int64)
    for row, cid in enumerate(ids.tolist()):
        labels = fed.client_data(cid).y.numpy()
        if labels.size and int(labels.max()) >= num_classes:
            raise DataError(f"client {cid} has label {int(labels.max())} but num_classes={num_classes}")
        out[row] = np.bincount(labels, minlength=num_classes)
    return out


def partition_stats(
    fed: FederatedDataset, num_classes: int, *, clients: np.ndarray | None = None
) -> PartitionStats:
    """Compute :class:`PartitionStats` for ``fed``, or for only the client ids ``clients`` (e.g. a sample).

    Materialises each client once when ``fed`` is not a :class:`PartitionedDataset`;
    ``ClientStats.cid`` is the client's id in ``fed``.

    Raises:
        DataError: if ``num_classes < 1`` or a label is out of range.
    """
    if num_classes < 1:
        raise DataError(f"num_classes must be >= 1, got {num_classes}")
    ids = np.arange(fed.num_clients) if clients is None else np.asarray(clients, dtype=np.int64)
    hist = label_histograms(fed, num_classes, clients=clients)  # (clients, classes)
    sizes = hist.sum(axis=1)
    distinct = (hist > 0).sum(axis=1)
    top = hist.argmax(axis=1)
    share = np.divide(hist.max(axis=1), sizes, out=np.zeros(len(sizes)), where=sizes > 0)
    rows = tuple(
        ClientStats(int(ids[i]), int(sizes[i]), int(distinct[i]), int(top[i]), float(share[i]))
        for i in range(len(sizes))
    )
    return PartitionStats(
        num_clients=len(sizes),
        num_classes=num_classes,
        total=int(sizes.sum()),
        sizes=SummaryStats.of(sizes),
        labels_per_client=SummaryStats.of(distinct),
        top_share=SummaryStats.of(share),
        histogram=hist,
        clients=rows,
    )


def _summary_table(stats: PartitionStats) -> Table:
    table = Table(title=f"{stats.num_clients} clients, {stats.total} examples, {stats.num_classes} classes")
    for col in ("quantity", "min", "mean", "median", "max", "std"):
        table.add_column(col, justify="left" if col == "quantity" else "right")
    for name, s, fmt in (
        ("examples per client", stats.sizes, "{:.1f}"),
        ("labels per client", stats.labels_per_client, "{:.2f}"),
        ("top-label share", stats.top_share, "{:.3f}"),
    ):
        table.add_row(name, *(fmt.format(v) for v in (s.min, s.mean, s.median, s.max, s.std)))
    return table


def _client_table(stats: PartitionStats, max_rows: int) -> Table:
    table = Table(title="per client" + (f" (first {max_rows})" if stats.num_clients > max_rows else ""))
    for col in ("client", "examples", "labels", "top label", "top share"):
        table.add_column(col, justify="right")
    for c in stats.clients[:max_rows]:
        table.add_row(str(c.cid), str(c.size), str(c.num_labels), str(c.top_label), f"{c.top_share:.3f}")
    return table


def render_partition_stats(stats: PartitionStats, console: Console, *, max_rows: int = 20) -> None:
    """Print a summary table and the first ``max_rows`` per-client rows to ``console``."""
    console.print(_summary_table(stats))
    if max_rows > 0:
        console.print(_client_table(stats, max_rows))


def format_partition_stats(stats: PartitionStats, *, max_rows: int = 20, width: int = 100) -> str:
    """The same report as :func:`render_partition_stats`, as plain text (no colour codes)."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=False)
    render_partition_stats(stats, console, max_rows=max_rows)
    return buffer.getvalue()
