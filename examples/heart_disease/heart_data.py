"""UCI Heart Disease (Cleveland, Hungarian, Switzerland, VA Long Beach) as four federated clients.

Reads the records with :func:`fedloom.data.heart_disease.read_raw`: by default the
copy shipped inside fedloom (CC BY 4.0, checksum-verified), or ``processed.<hospital>.data``
from a directory given as ``--data-dir``. Each file is comma-separated without a
header, ``?`` marks a missing value, and has 14 columns: 13 features and ``num``
(0 = no disease, 1-4 = disease), binarised to ``num > 0``.

Preprocessing follows FLamby's Fed-Heart-Disease in spirit, strictly per hospital
(nothing is pooled): a fixed 80/20 train/test split per hospital (a seeded
permutation), missing values imputed with the hospital's *training* column means
(a column missing everywhere in a hospital becomes 0), then features standardised
with the hospital's training mean and standard deviation.

Loader interface (see ``fedloom.net.datasources``):

* ``load_client(hospital, data_dir)`` -- the hospital's training split;
* ``load_eval(hospital_or_all, data_dir)`` -- its test split, or every hospital's
  test split concatenated for ``all`` (the server's central evaluation in this demo).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedloom.core.rng import numpy_rng
from fedloom.data.datasets import ArrayDataset
from fedloom.data.heart_disease import HOSPITALS, read_raw

__all__ = ["HOSPITALS", "load_client", "load_eval", "read_raw"]

TEST_FRACTION = 0.2


def _split(hospital: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    order = numpy_rng(0, f"heart-split-{hospital}").permutation(n)
    n_test = round(n * TEST_FRACTION)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def _prepare(hospital: str, data_dir: Path | None, split: str) -> ArrayDataset:
    x, y = read_raw(hospital, data_dir)
    train_idx, test_idx = _split(hospital, len(y))
    train = x[train_idx]
    observed = ~np.isnan(train)
    counts = observed.sum(axis=0)
    # Column means over observed values; a column missing everywhere in this hospital becomes 0.
    means = np.where(counts > 0, np.where(observed, train, 0.0).sum(axis=0) / np.maximum(counts, 1), 0.0)
    filled_train = np.where(np.isnan(train), means, train)
    std = filled_train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    idx = train_idx if split == "train" else test_idx
    part = np.where(np.isnan(x[idx]), means, x[idx])
    feats = (part - means) / std
    return ArrayDataset(torch.from_numpy(feats.astype(np.float32)), torch.from_numpy(y[idx]), num_classes=2)


def load_client(hospital: str, data_dir: Path | None) -> ArrayDataset:
    return _prepare(hospital, data_dir, "train")


def load_eval(hospital: str, data_dir: Path | None) -> ArrayDataset:
    names = HOSPITALS if hospital == "all" else (hospital,)
    parts = [_prepare(h, data_dir, "test") for h in names]
    return ArrayDataset(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]), num_classes=2)
