"""partition_stats on hand-computed federations, and its renderings."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from rich.console import Console

from fedloom.core.errors import DataError
from fedloom.data import (
    ArrayDataset,
    PartitionedDataset,
    format_partition_stats,
    partition_stats,
    render_partition_stats,
    synthetic_fedprox,
)


def tiny() -> PartitionedDataset:
    # labels: 0 0 1 | 2 2 2 | (empty)
    base = ArrayDataset(torch.zeros(6, 1), torch.tensor([0, 0, 1, 2, 2, 2]), 3)
    return PartitionedDataset(base, [np.array([0, 1, 2]), np.array([3, 4, 5]), np.array([], dtype=np.int64)])


def test_hand_computed_numbers() -> None:
    s = partition_stats(tiny(), 3)
    assert s.num_clients == 3
    assert s.total == 6
    assert s.histogram.tolist() == [[2, 1, 0], [0, 0, 3], [0, 0, 0]]
    assert (s.sizes.min, s.sizes.mean, s.sizes.median, s.sizes.max) == (0.0, 2.0, 3.0, 3.0)
    assert s.sizes.std == pytest.approx(np.sqrt(2.0))
    assert (s.labels_per_client.min, s.labels_per_client.max) == (0.0, 2.0)
    assert [(c.cid, c.size, c.num_labels, c.top_label) for c in s.clients] == [
        (0, 3, 2, 0),
        (1, 3, 1, 2),
        (2, 0, 0, 0),
    ]
    assert [c.top_share for c in s.clients] == pytest.approx([2 / 3, 1.0, 0.0])


def test_generic_path_matches_direct_count() -> None:
    fed = synthetic_fedprox(0.5, 0.5, seed=1, num_clients=5)
    s = partition_stats(fed, 10)
    for cid in range(5):
        assert s.histogram[cid].tolist() == np.bincount(fed.client_data(cid).y.numpy(), minlength=10).tolist()
    assert s.total == int(fed.client_sizes().sum())


def test_label_out_of_range_and_bad_num_classes() -> None:
    with pytest.raises(DataError, match="num_classes=2"):
        partition_stats(tiny(), 2)
    with pytest.raises(DataError, match="num_classes must be >= 1"):
        partition_stats(tiny(), 0)


def test_renderings_contain_the_numbers() -> None:
    s = partition_stats(tiny(), 3)
    buffer = io.StringIO()
    render_partition_stats(s, Console(file=buffer, width=120, color_system=None), max_rows=2)
    text = buffer.getvalue()
    assert "3 clients, 6 examples, 3 classes" in text
    assert "first 2" in text
    assert "0.667" in text
    plain = format_partition_stats(s)
    assert "examples per client" in plain
    assert "\x1b[" not in plain
