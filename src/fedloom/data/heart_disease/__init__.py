"""UCI Heart Disease, four hospitals, shipped with fedloom (CC BY 4.0, see ``LICENSE.txt`` here).

The package holds the four ``processed.<hospital>.data`` files of the UCI
Machine Learning Repository's Heart Disease dataset (Janosi, Steinbrunn,
Pfisterer & Detrano 1988, doi:10.24432/C52P4X), unchanged: the four natural
silos of FLamby's Fed-Heart-Disease. Each file is comma-separated without a
header, ``?`` marks a missing value, and has 14 columns: ``age sex cp trestbps
chol fbs restecg thalach exang oldpeak slope ca thal`` and the target ``num``
(0 = no disease, 1-4 = disease).

:func:`read_table` reads one hospital's file, from the packaged copy (its
SHA-256 checked against :data:`SHA256` on every read) or from a directory the
caller names (read as it is); :func:`read_raw` splits it into features and the
binary target ``num > 0``. Preprocessing (splits, imputation, scaling) is the
caller's choice; ``examples/heart_disease/heart_data.py`` shows one.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

import numpy as np

from fedloom.core.errors import ChecksumError, DataError

__all__ = ["HOSPITALS", "SHA256", "packaged_dir", "read_raw", "read_table"]

HOSPITALS = ("cleveland", "hungarian", "switzerland", "va")

#: SHA-256 of each packaged ``processed.<hospital>.data`` file.
SHA256 = {
    "cleveland": "a74b7efa387bc9d108d7d0115d831fe9b414b29ae7124f331b622b4efa0427c8",
    "hungarian": "d1ad108f785768cd3d7e82dc522e6f5a61eea93cccfb3a46ee8076f73fc3d796",
    "switzerland": "834a405ccf5b66ab4056bb77794adc8df0b7125186454c0a1d002d33c6c3b314",
    "va": "e7c93d8d0d2acdadfa4c5e8de768e2191e7f618b952e29623f1f0d5949ff6b8f",
}

NUM_COLUMNS = 14


def file_name(hospital: str) -> str:
    """``processed.<hospital>.data``; :class:`DataError` for an unknown hospital."""
    if hospital not in HOSPITALS:
        raise DataError(f"unknown hospital {hospital!r}; expected one of {', '.join(HOSPITALS)}")
    return f"processed.{hospital}.data"


def packaged_dir() -> Path:
    """The directory of the packaged files (to pass as ``--data-dir``, for instance)."""
    return Path(str(resources.files(__name__)))


def _packaged_bytes(hospital: str) -> tuple[bytes, str]:
    name = file_name(hospital)
    resource = resources.files(__name__).joinpath(name)
    try:
        content = resource.read_bytes()
    except OSError as exc:
        raise DataError(f"the packaged {name} cannot be read ({exc}); reinstall fedloom") from exc
    actual = hashlib.sha256(content).hexdigest()
    if actual != SHA256[hospital]:
        raise ChecksumError(
            f"{resource}: SHA-256 is {actual}, expected {SHA256[hospital]}; the packaged heart-disease "
            "file is corrupt or was edited - reinstall fedloom"
        )
    return content, str(resource)


def read_table(hospital: str, data_dir: str | Path | None = None) -> np.ndarray:
    """One hospital's records as a float64 array ``(N, 14)``, NaN where the file has ``?``.

    ``data_dir`` ``None`` (or :func:`packaged_dir`) reads the packaged copy,
    checksum-verified; otherwise ``data_dir / processed.<hospital>.data`` as it is.

    Raises:
        ChecksumError: the packaged file differs from the shipped one.
        DataError: unknown hospital, missing file, or a malformed line (named by path and line).
    """
    if data_dir is None or Path(data_dir).expanduser().resolve() == packaged_dir().resolve():
        content, where = _packaged_bytes(hospital)
    else:
        path = Path(data_dir).expanduser() / file_name(hospital)
        if not path.is_file():
            raise DataError(
                f"{path} does not exist; leave the data directory unset to use the copy shipped with "
                "fedloom, or point it at a folder with the UCI Heart Disease 'processed' files"
            )
        content, where = path.read_bytes(), str(path)
    rows = []
    for n, line in enumerate(content.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        cells = line.strip().split(",")
        if len(cells) != NUM_COLUMNS:
            raise DataError(f"{where}:{n}: expected {NUM_COLUMNS} comma-separated values, found {len(cells)}")
        try:
            rows.append([np.nan if c.strip() == "?" else float(c) for c in cells])
        except ValueError as exc:
            raise DataError(f"{where}:{n}: {exc}") from None
    return np.asarray(rows, dtype=np.float64).reshape(-1, NUM_COLUMNS)


def read_raw(hospital: str, data_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Features ``(N, 13)`` float64 with NaN for missing values, labels ``(N,)`` int64 ``num > 0``."""
    table = read_table(hospital, data_dir)
    return table[:, :13], (table[:, 13] > 0).astype(np.int64)
