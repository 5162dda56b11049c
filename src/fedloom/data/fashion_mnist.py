"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, arXiv 1708.07747; MIT), found locally or fetched, always verified.

Zalando's drop-in replacement for MNIST: 60000 training and 10000 test 28x28
greyscale images of ten kinds of clothing (:data:`FASHION_MNIST_CLASSES`), in
the same four IDX files. :func:`load_fashion_mnist` tries, in order, and stops
at the first that has all four files:

1. ``data_dir`` (if given), then its ``fashion_mnist`` and ``fashion-mnist`` folders;
2. ``$FEDLOOM_DATA`` and the same two folders under it;
3. the cache, ``platformdirs.user_cache_dir("fedloom")`` and the same folders;
4. ``/usr/share/datasets/fashion-mnist``, where Debian's and Ubuntu's
   ``dataset-fashion-mnist`` package puts them (``apt-get install dataset-fashion-mnist``);
5. a download into ``<cache>/fashion_mnist`` from Zalando's published copies.

Every file is checked against the SHA-256 of its decompressed content
(:data:`~fedloom.data.locate.FASHION_MNIST_FILES`):

=========================  ================================================================
train-images-idx3-ubyte    c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888
train-labels-idx1-ubyte    bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9
t10k-images-idx3-ubyte     5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b
t10k-labels-idx1-ubyte     0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34
=========================  ================================================================

A mismatch raises :class:`~fedloom.core.errors.ChecksumError`; finding nothing
raises :class:`~fedloom.core.errors.DataError` listing every place tried.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedloom.core.errors import DataError
from fedloom.data.datasets import ArrayDataset
from fedloom.data.download import FASHION_MNIST_MIRRORS, Fetch, download_mnist, fetch_url
from fedloom.data.locate import (
    DATA_ENV_VAR,
    DEBIAN_FASHION_MNIST_DIR,
    FASHION_MNIST_FILES,
    MnistFile,
    default_cache_dir,
    find_mnist_files,
    search_directories,
)
from fedloom.data.mnist import MnistData, MnistRaw, normalize_mnist, read_idx_set

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "load_fashion_mnist",
    "load_fashion_mnist_raw",
]

#: The ten labels, by class index.
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
#: Mean and standard deviation of the training pixels scaled to [0, 1].
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

_NAME = "Fashion-MNIST"


def load_fashion_mnist(
    data_dir: str | Path | None = None,
    *,
    download: bool = True,
    cache_dir: str | Path | None = None,
    use_env: bool = True,
    system_dir: Path | None = DEBIAN_FASHION_MNIST_DIR,
    fetch: Fetch = fetch_url,
    specs: tuple[MnistFile, ...] = FASHION_MNIST_FILES,
) -> MnistData:
    """Load Fashion-MNIST as normalised tensors: x float32 ``(N, 1, 28, 28)``, y int64, 10 classes.

    Arguments as for :func:`load_fashion_mnist_raw`.
    """
    raw = load_fashion_mnist_raw(
        data_dir,
        download=download,
        cache_dir=cache_dir,
        use_env=use_env,
        system_dir=system_dir,
        fetch=fetch,
        specs=specs,
    )

    def dataset(images: np.ndarray, labels: np.ndarray) -> ArrayDataset:
        x = normalize_mnist(images, FASHION_MNIST_MEAN, FASHION_MNIST_STD)
        return ArrayDataset(x, torch.from_numpy(labels.astype(np.int64)), len(FASHION_MNIST_CLASSES))

    return MnistData(
        train=dataset(raw.train_images, raw.train_labels),
        test=dataset(raw.test_images, raw.test_labels),
        source=raw.source,
    )


def load_fashion_mnist_raw(
    data_dir: str | Path | None = None,
    *,
    download: bool = True,
    cache_dir: str | Path | None = None,
    use_env: bool = True,
    system_dir: Path | None = DEBIAN_FASHION_MNIST_DIR,
    fetch: Fetch = fetch_url,
    specs: tuple[MnistFile, ...] = FASHION_MNIST_FILES,
) -> MnistRaw:
    """Find, verify and read the four Fashion-MNIST IDX files (see the module docstring).

    Args:
        data_dir: a directory to look in first (``data.dir``).
        download: whether to try Zalando's copies as a last resort.
        cache_dir: the cache directory; defaults to fedloom's user cache.
        use_env: whether to consult ``$FEDLOOM_DATA``.
        system_dir: the Debian package's directory; ``None`` skips it.
        fetch: the HTTP GET used for downloading (tests pass an in-memory fake).
        specs: the files' expected digests and shapes (tests pass their own).

    Raises:
        ChecksumError: a found file's content differs from its known digest.
        DataError: the files were found nowhere (the message lists every place tried).
    """
    if data_dir is not None and str(data_dir) and not Path(data_dir).expanduser().is_dir():
        raise DataError(
            f"data.dir = {str(data_dir)!r} is not a directory; fix the path (it should hold the four "
            "Fashion-MNIST IDX files, or a 'fashion_mnist' folder with them)"
        )
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    places, tried = search_directories(
        data_dir, use_env=use_env, cache_dir=cache, subfolders=("fashion_mnist", "fashion-mnist")
    )
    if system_dir is None:
        tried.append("dataset-fashion-mnist package: not consulted (system_dir=None)")
    else:
        places.append(("dataset-fashion-mnist package", system_dir))
    for label, directory in places:
        files, reason = find_mnist_files(directory, specs, dataset=_NAME)
        if files is None:
            tried.append(f"{label} {directory}: {reason}")
            continue
        return read_idx_set(files, source=f"IDX files in {directory} ({label})", specs=specs, dataset=_NAME)

    target = cache / "fashion_mnist"
    if not download:
        tried.append("download: not attempted (download=False)")
    else:
        try:
            download_mnist(target, mirrors=FASHION_MNIST_MIRRORS, fetch=fetch, specs=specs)
        except DataError as exc:
            tried.append(f"download into {target}: {exc}")
        else:
            files, reason = find_mnist_files(target, specs, dataset=_NAME)
            if files is not None:
                return read_idx_set(files, source=f"downloaded into {target}", specs=specs, dataset=_NAME)
            tried.append(f"download into {target}: files vanished after download ({reason})")

    raise DataError(
        "Fashion-MNIST not found. Sources tried:\n" + "\n".join(f"  - {t}" for t in tried) + "\nFix one of:\n"
        "  - pass a directory holding the four IDX files (train-images-idx3-ubyte[.gz] etc.) as data.dir;\n"
        f"  - set {DATA_ENV_VAR} to such a directory;\n"
        "  - `apt-get install dataset-fashion-mnist` (Debian, Ubuntu);\n"
        f"  - go online and allow the download into {target}."
    )
