"""Fixtures for the data-layer tests: the shared MNIST copy, loaded once per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedloom.data.mnist import MnistRaw, load_mnist_raw

# tests/data/conftest.py -> parents[2] is the repository root; `shared` is its sibling.
SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
MNIST_NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


@pytest.fixture(scope="session")
def shared_mnist_dir() -> Path:
    """The folder with the four gzipped MNIST IDX files, or skip."""
    folder = SHARED_DATA / "mnist"
    if not all((folder / n).is_file() for n in MNIST_NAMES):
        pytest.skip(f"shared MNIST copy not found in {folder.resolve()}")
    return folder


@pytest.fixture(scope="session")
def mnist_raw(shared_mnist_dir: Path) -> MnistRaw:
    """The shared MNIST copy, read and checksum-verified through the IDX path."""
    return load_mnist_raw(shared_mnist_dir, download=False, use_env=False, use_package=False)


@pytest.fixture(scope="session")
def mnist_train_labels(mnist_raw: MnistRaw) -> np.ndarray:
    return mnist_raw.train_labels.astype(np.int64)
