"""download_mnist with in-memory fake mirrors: verification, fallback, dead mirrors."""

from __future__ import annotations

import gzip
import urllib.error
from pathlib import Path

import pytest

from fedloom.core.errors import DataError
from fedloom.data import download_mnist

MIRRORS = ("https://a.example/mnist/", "https://b.example/mnist")


def serve(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.glob("*.gz")}


def test_bad_file_on_first_mirror_falls_back(tmp_path: Path, shared_mnist_dir: Path) -> None:
    files = serve(shared_mnist_dir)
    seen: list[str] = []

    def fetch(url: str, timeout: float) -> bytes:
        seen.append(url)
        name = url.rsplit("/", 1)[1]
        if url.startswith("https://a.example") and name.startswith("t10k-labels"):
            return gzip.compress(b"tampered")
        return files[name]

    download_mnist(tmp_path, mirrors=MIRRORS, fetch=fetch)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)
    assert (tmp_path / "t10k-labels-idx1-ubyte.gz").read_bytes() == files["t10k-labels-idx1-ubyte.gz"]
    assert "https://b.example/mnist/t10k-labels-idx1-ubyte.gz" in seen  # trailing slash added


def test_every_mirror_bad_raises_with_digests(tmp_path: Path) -> None:
    def fetch(url: str, timeout: float) -> bytes:
        return gzip.compress(b"wrong")

    with pytest.raises(DataError) as info:
        download_mnist(tmp_path, mirrors=MIRRORS, fetch=fetch)
    text = str(info.value)
    assert "expected ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db" in text
    assert "https://b.example/mnist/train-images-idx3-ubyte.gz" in text
    assert list(tmp_path.iterdir()) == []  # nothing unverified is written


def test_http_error_does_not_mark_mirror_dead(tmp_path: Path, shared_mnist_dir: Path) -> None:
    files = serve(shared_mnist_dir)
    seen: list[str] = []

    def fetch(url: str, timeout: float) -> bytes:
        seen.append(url)
        name = url.rsplit("/", 1)[1]
        if url.startswith("https://a.example") and name.startswith("train-images"):
            raise urllib.error.HTTPError(url, 404, "Not Found", None, None)  # type: ignore[arg-type]
        return files[name]

    download_mnist(tmp_path, mirrors=MIRRORS, fetch=fetch)
    assert sum(u.startswith("https://a.example") for u in seen) == 4  # still used for the other files


def test_not_gzip_is_reported(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a valid gzip file"):
        download_mnist(tmp_path, mirrors=MIRRORS[:1], fetch=lambda url, timeout: b"<html>")
