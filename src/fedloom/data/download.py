"""Downloading the four MNIST IDX files from public mirrors, verified.

Each file is fetched from the first mirror that answers, its decompressed
content is checked against the known SHA-256, and only then is it written
(atomically: temporary file + rename) into the destination directory. The HTTP
call is a parameter (:data:`Fetch`), so tests substitute an in-memory fake and
proxies or offline mirrors can be plugged in without monkeypatching.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

from fedloom.core.errors import DataError
from fedloom.data.locate import FASHION_MNIST_FILES, MNIST_FILES, MnistFile

__all__ = [
    "FASHION_MNIST_MIRRORS",
    "MNIST_MIRRORS",
    "Fetch",
    "download_fashion_mnist",
    "download_mnist",
    "fetch_url",
]

#: Public mirrors of the original yann.lecun.com files (gzipped IDX), tried in order.
MNIST_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

#: Zalando's published copies of the four Fashion-MNIST ``.gz`` files, tried in order (plain HTTP is
#: acceptable: every file is checked against its SHA-256 before it is written).
FASHION_MNIST_MIRRORS: tuple[str, ...] = (
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
)

#: ``fetch(url, timeout_s) -> body``; raises ``OSError`` (incl. ``urllib.error.URLError``) on failure.
Fetch = Callable[[str, float], bytes]

_MAX_BYTES = 32 * 1024 * 1024  # the largest MNIST .gz is ~9.9 MB


def fetch_url(url: str, timeout: float) -> bytes:
    """GET ``url`` with ``urllib`` and return the body (at most 32 MiB)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body: bytes = response.read(_MAX_BYTES + 1)
    if len(body) > _MAX_BYTES:
        raise OSError(f"{url}: response larger than {_MAX_BYTES} bytes")
    return body


def download_mnist(
    dest: Path,
    *,
    mirrors: Sequence[str] = MNIST_MIRRORS,
    fetch: Fetch = fetch_url,
    timeout: float = 10.0,
    specs: tuple[MnistFile, ...] = MNIST_FILES,
) -> None:
    """Download and verify the four MNIST ``.gz`` files (or those of ``specs``) into ``dest`` (created if needed).

    A mirror that fails with a network error (rather than a bad file or an HTTP
    error) is not tried again for the remaining files, which keeps the offline
    case to one timeout per mirror.

    Raises:
        DataError: if some file could not be obtained from any mirror; the message
            lists each file's failure on each mirror. Files verified before the
            failure are kept.
    """
    dead: dict[str, str] = {}
    failures: list[str] = []
    for spec in specs:
        name = spec.canonical_name + ".gz"
        reasons: list[str] = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + name
            if mirror in dead:
                reasons.append(f"{mirror}: skipped, unreachable earlier")
                continue
            try:
                body = fetch(url, timeout)
            except urllib.error.HTTPError as exc:
                reasons.append(f"{url}: HTTP {exc.code}")
                continue
            except OSError as exc:  # URLError, timeouts, connection resets
                dead[mirror] = str(getattr(exc, "reason", exc))
                reasons.append(f"{url}: {dead[mirror]}")
                continue
            problem = _verify(body, spec.sha256)
            if problem:
                reasons.append(f"{url}: {problem}")
                continue
            _write_atomically(dest, name, body)
            reasons.clear()
            break
        if reasons:
            failures.append(f"{name}:\n" + "\n".join(f"      {r}" for r in reasons))
    if failures:
        raise DataError("download failed for:\n" + "\n".join(f"    {f}" for f in failures))


def _verify(body: bytes, sha256: str) -> str:
    """``""`` if ``body`` gunzips to content with digest ``sha256``, else the problem."""
    try:
        content = gzip.decompress(body)
    except (OSError, EOFError, zlib.error) as exc:
        return f"not a valid gzip file ({exc})"
    actual = hashlib.sha256(content).hexdigest()
    return "" if actual == sha256 else f"SHA-256 of the content is {actual}, expected {sha256}"


def _write_atomically(dest: Path, name: str, body: bytes) -> None:
    try:
        dest.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest, prefix=f".{name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(body)
            os.replace(tmp, dest / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise DataError(
            f"cannot write {dest / name}: {exc}; check that the cache directory is writable"
        ) from exc


def download_fashion_mnist(
    dest: Path,
    *,
    mirrors: Sequence[str] = FASHION_MNIST_MIRRORS,
    fetch: Fetch = fetch_url,
    timeout: float = 10.0,
    specs: tuple[MnistFile, ...] = FASHION_MNIST_FILES,
) -> None:
    """:func:`download_mnist` for Fashion-MNIST's four files and mirrors."""
    download_mnist(dest, mirrors=mirrors, fetch=fetch, timeout=timeout, specs=specs)
