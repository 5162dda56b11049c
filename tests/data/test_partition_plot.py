"""Partition plots: real PNG files of the documented size, from the library and from `fedloom partition --plot`."""

from __future__ import annotations

import struct
import textwrap
from pathlib import Path

import numpy as np
import torch
from tests.conftest import run_cli

from fedloom.data import ArrayDataset, PartitionedDataset, partition, partition_stats
from fedloom.data.partition_plot import DPI, FIGSIZE, HEATMAP_PNG, SIZES_PNG, plot_partition


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert data[-8:-4] == b"IEND"
    return width, height


def test_plot_partition_writes_two_pngs_of_the_documented_size(tmp_path: Path) -> None:
    labels = torch.from_numpy(np.repeat(np.arange(13), 30))
    base = ArrayDataset(torch.zeros(labels.numel(), 2), labels)
    fed = PartitionedDataset(base, partition(labels.numpy(), "dirichlet", 25, 0, alpha=0.3, min_size=0))
    heat, sizes = plot_partition(partition_stats(fed, 13), tmp_path / "plots")
    assert (heat.name, sizes.name) == (HEATMAP_PNG, SIZES_PNG)
    expected = (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))
    assert expected == (800, 600)
    assert png_size(heat) == expected
    assert png_size(sizes) == expected


TASK = textwrap.dedent(
    """
    import torch
    from torch import nn
    from fedloom import ArrayDataset, CentralData, Task

    def make():
        g = torch.Generator().manual_seed(0)
        y = torch.arange(7).repeat_interleave(60)  # seven classes, 60 examples each
        x = torch.randn(420, 3, generator=g)
        return Task(model=lambda: nn.Linear(3, 7), data=CentralData(train=ArrayDataset(x, y)), name="seven")
    """
)


def test_partition_cli_plots_and_counts_classes_from_the_data(tmp_path: Path) -> None:
    (tmp_path / "seven_task.py").write_text(TASK, encoding="utf-8")
    cfg = tmp_path / "exp.toml"
    cfg.write_text('task = "seven_task:make"\n', encoding="utf-8")
    out = tmp_path / "plots"
    proc = run_cli("partition", "--config", str(cfg), "--set", "data.partition=pathological",
                   "--set", "data.num_clients=14", "--set", "data.classes_per_client=3",
                   "--plot", str(out), cwd=tmp_path)  # fmt: skip
    assert "14 clients, 420 examples, 7 classes" in proc.stdout
    # labels per client: min, mean, median and max are all exactly 3.
    row = next(line for line in proc.stdout.splitlines() if "labels per client" in line)
    cells = [c.strip() for c in row.split("│") if c.strip()]  # rich draws the table with box characters
    assert cells[1:5] == ["3.00", "3.00", "3.00", "3.00"]
    assert png_size(out / HEATMAP_PNG) == (800, 600)
    assert png_size(out / SIZES_PNG) == (800, 600)
