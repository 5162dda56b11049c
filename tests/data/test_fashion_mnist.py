"""Fashion-MNIST: the search order, checksum verification, download and the built-in task.

No copy of the real files is assumed: each test writes a tiny Fashion-MNIST-shaped IDX set
(12 training and 5 test images) and passes the loader that set's own digests and shapes in
place of the real ones, so the code path that verifies the real files runs on every clone.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fedloom.core.errors import ChecksumError, DataError
from fedloom.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    load_fashion_mnist,
    load_fashion_mnist_raw,
)
from fedloom.data.idx import encode_idx_uint8
from fedloom.data.locate import DEBIAN_FASHION_MNIST_DIR, FASHION_MNIST_FILES, MnistFile


def tiny_set(folder: Path, *, gz: bool = True) -> tuple[tuple[MnistFile, ...], dict[str, np.ndarray]]:
    """Write four IDX files into ``folder``; return specs with their digests and the arrays."""
    gen = np.random.default_rng(0)
    arrays = {
        "train-images": gen.integers(0, 256, (12, 28, 28), dtype=np.uint8),
        "train-labels": np.arange(12, dtype=np.uint8) % 10,
        "t10k-images": gen.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        "t10k-labels": np.array([9, 0, 0, 3, 8], dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    specs = []
    for spec in FASHION_MNIST_FILES:
        raw = encode_idx_uint8(arrays[spec.key])
        name = spec.canonical_name + (".gz" if gz else "")
        (folder / name).write_bytes(gzip.compress(raw, mtime=0) if gz else raw)
        specs.append(replace(spec, sha256=hashlib.sha256(raw).hexdigest(), shape=arrays[spec.key].shape))
    return tuple(specs), arrays


def no_download(url: str, timeout: float) -> bytes:
    raise AssertionError(f"unexpected download of {url}")


def test_documented_digests_and_debian_location() -> None:
    assert [s.canonical_name for s in FASHION_MNIST_FILES] == [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ]
    assert [s.shape for s in FASHION_MNIST_FILES] == [(60000, 28, 28), (60000,), (10000, 28, 28), (10000,)]
    assert all(len(s.sha256) == 64 for s in FASHION_MNIST_FILES)
    assert str(DEBIAN_FASHION_MNIST_DIR) == "/usr/share/datasets/fashion-mnist"
    assert len(FASHION_MNIST_CLASSES) == 10


def test_reads_and_normalises_a_verified_set(tmp_path: Path) -> None:
    specs, arrays = tiny_set(tmp_path / "data" / "fashion_mnist")
    data = load_fashion_mnist(
        tmp_path / "data",
        use_env=False,
        cache_dir=tmp_path / "c",
        system_dir=None,
        fetch=no_download,
        specs=specs,
    )
    assert tuple(data.train.x.shape) == (12, 1, 28, 28)
    assert data.train.num_classes == 10
    assert data.test.y.tolist() == [9, 0, 0, 3, 8]
    expected = (arrays["train-images"][3].astype(np.float32) / 255 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    assert torch.allclose(data.train.x[3, 0], torch.from_numpy(expected), atol=1e-6)
    assert "data_dir" in data.source


def test_found_in_env_then_in_the_debian_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    specs, _ = tiny_set(tmp_path / "env" / "fashion-mnist", gz=False)
    monkeypatch.setenv("FEDLOOM_DATA", str(tmp_path / "env"))
    raw = load_fashion_mnist_raw(
        None, cache_dir=tmp_path / "c", system_dir=None, fetch=no_download, specs=specs
    )
    assert "$FEDLOOM_DATA" in raw.source
    system = tmp_path / "usr-share-datasets-fashion-mnist"
    specs, _ = tiny_set(system)
    raw = load_fashion_mnist_raw(
        None, use_env=False, cache_dir=tmp_path / "c", system_dir=system, fetch=no_download, specs=specs
    )
    assert "dataset-fashion-mnist package" in raw.source


def test_a_corrupt_file_is_an_error_not_a_fallthrough(tmp_path: Path) -> None:
    specs, _ = tiny_set(tmp_path / "d")
    (tmp_path / "d" / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(encode_idx_uint8(np.zeros(5, np.uint8)))
    )
    with pytest.raises(ChecksumError, match=r"Fashion-MNIST t10k-labels-idx1-ubyte"):
        load_fashion_mnist_raw(
            tmp_path / "d", use_env=False, cache_dir=tmp_path / "c", system_dir=None, specs=specs
        )
    # The real digests reject the tiny set.
    with pytest.raises(ChecksumError, match="c59f468a2f672dc815687fe0f83887768d799fd8"):
        load_fashion_mnist_raw(tmp_path / "d", use_env=False, cache_dir=tmp_path / "c", system_dir=None)


def test_downloads_into_the_cache_and_verifies(tmp_path: Path) -> None:
    served = tmp_path / "served"
    specs, _ = tiny_set(served)
    urls: list[str] = []

    def fetch(url: str, timeout: float) -> bytes:
        urls.append(url)
        return (served / url.rsplit("/", 1)[1]).read_bytes()

    cache = tmp_path / "cache"
    raw = load_fashion_mnist_raw(
        None, use_env=False, cache_dir=cache, system_dir=None, fetch=fetch, specs=specs
    )
    assert raw.source == f"downloaded into {cache / 'fashion_mnist'}"
    assert urls[0].startswith("https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/")
    assert (cache / "fashion_mnist" / "train-images-idx3-ubyte.gz").is_file()


def test_absent_everywhere_names_every_place(tmp_path: Path) -> None:
    def offline(url: str, timeout: float) -> bytes:
        raise OSError("network is unreachable")

    with pytest.raises(DataError) as err:
        load_fashion_mnist_raw(
            tmp_path, use_env=False, cache_dir=tmp_path / "c", system_dir=tmp_path / "none", fetch=offline
        )
    msg = str(err.value)
    assert "Fashion-MNIST not found" in msg
    assert f"dataset-fashion-mnist package {tmp_path / 'none'}: no such directory" in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "network is unreachable" in msg


def test_builtin_task_from_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedloom.config import load_config
    from fedloom.sim.build import materialise_config

    real = tmp_path / "data"
    specs, _ = tiny_set(real)
    # The real loader, told the tiny set's digests (the task itself always checks the real ones).
    monkeypatch.setattr(
        "fedloom.tasks.builtin.load_fashion_mnist",
        lambda data_dir: load_fashion_mnist(
            data_dir, use_env=False, system_dir=None, fetch=no_download, specs=specs
        ),
    )
    cfg = load_config(None, ["data.dataset='fashion_mnist'", f"data.dir={str(real)!r}", "data.num_clients=3",
                             "data.partition='iid'"])  # fmt: skip
    m = materialise_config(cfg)
    assert m.train.num_clients == 3
    assert sorted(m.train.client_sizes().tolist()) == [4, 4, 4]
    assert m.test is not None
    assert m.test.y.tolist() == [9, 0, 0, 3, 8]
    assert str(real) in m.source
