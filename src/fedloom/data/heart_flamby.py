"""FLamby's Fed-Heart-Disease preprocessing of the shipped UCI heart-disease files.

FLamby (Ogier du Terrail et al. 2022, arXiv 2210.04620) makes each of the four
hospitals of :mod:`fedloom.data.heart_disease` one client. Its preprocessing,
reimplemented here without pandas or scikit-learn:

1. drop the columns ``slope``, ``ca`` and ``thal`` (mostly missing outside Cleveland);
2. drop every record that still has a missing value: 303, 261, 46 and 130
   records remain (740 in all);
3. the target is ``num > 0`` (heart disease);
4. one-hot encode ``cp`` (chest pain type, 1-4) and ``restecg`` (0-2) dropping
   the first level, giving 13 features in the order of :data:`FEATURES`
   (not standardised, as in FLamby);
5. split each hospital 66/34 into train and test: ``floor(0.66 n)`` training
   records, stratified by the target when each class has more than two records
   (every hospital but Switzerland), giving 199/104, 172/89, 30/16 and 85/45.

FLamby draws its split with scikit-learn's ``train_test_split(random_state=43)``;
fedloom draws the same sizes and strata from ``numpy_rng(43, "heart-split-<hospital>")``,
so which records are held out differs from FLamby's, while the split is just as
fixed (it does not depend on the experiment seed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedloom.core.rng import numpy_rng
from fedloom.data.datasets import ArrayDataset
from fedloom.data.heart_disease import HOSPITALS, read_table

__all__ = ["FEATURES", "SPLIT_SIZES", "TRAIN_FRACTION", "all_hospitals", "flamby_heart", "stratified_split"]

TRAIN_FRACTION = 0.66
#: The 13 feature columns after preprocessing, in order.
FEATURES = (
    "age",
    "sex",
    "trestbps",
    "chol",
    "fbs",
    "thalach",
    "exang",
    "oldpeak",
    "cp=2",
    "cp=3",
    "cp=4",
    "restecg=1",
    "restecg=2",
)
#: (train, test) records per hospital.
SPLIT_SIZES = {"cleveland": (199, 104), "hungarian": (172, 89), "switzerland": (30, 16), "va": (85, 45)}

_NUMERIC = [0, 1, 3, 4, 5, 7, 8, 9]  # age sex trestbps chol fbs thalach exang oldpeak
_CP, _RESTECG, _DROPPED = 2, 6, [10, 11, 12]


def stratified_split(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(train, test)`` sorted index arrays: ``floor(0.66 n)`` train, stratified when each class has > 2 records.

    With strata, each class's test count is ``n_test * n_c / n`` rounded down,
    the remainder going to the classes with the largest fractional parts.
    """
    n = labels.size
    n_train = int(np.floor(TRAIN_FRACTION * n))
    n_test = n - n_train
    classes, counts = np.unique(labels, return_counts=True)
    if classes.size < 2 or counts.min() <= 2:
        order = rng.permutation(n)
        return np.sort(order[n_test:]), np.sort(order[:n_test])
    exact = n_test * counts / n
    take = np.floor(exact).astype(np.int64)
    for c in np.argsort(-(exact - take), kind="stable")[: n_test - int(take.sum())]:
        take[c] += 1
    test = np.concatenate(
        [rng.permutation(np.flatnonzero(labels == c))[:t] for c, t in zip(classes, take, strict=True)]
    )
    mask = np.zeros(n, dtype=bool)
    mask[test] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def _features(table: np.ndarray) -> np.ndarray:
    cp = table[:, _CP][:, None] == np.array([2.0, 3.0, 4.0])
    restecg = table[:, _RESTECG][:, None] == np.array([1.0, 2.0])
    return np.concatenate([table[:, _NUMERIC], cp, restecg], axis=1).astype(np.float32)  # (N, 13)


def flamby_heart(hospital: str, data_dir: str | Path | None = None) -> tuple[ArrayDataset, ArrayDataset]:
    """One hospital's ``(train, test)``: x float32 ``(N, 13)``, y int64 ``num > 0``, 2 classes.

    Raises:
        DataError: for an unknown hospital or an unreadable file (see :func:`read_table`).
    """
    table = read_table(hospital, data_dir)
    kept = np.delete(table, _DROPPED, axis=1)
    table = table[~np.isnan(kept).any(axis=1)]
    x = _features(table)
    y = (table[:, 13] > 0).astype(np.int64)
    train, test = stratified_split(y, numpy_rng(43, f"heart-split-{hospital}"))

    def part(idx: np.ndarray) -> ArrayDataset:
        return ArrayDataset(torch.from_numpy(x[idx]), torch.from_numpy(y[idx]), 2)

    return part(train), part(test)


def all_hospitals(data_dir: str | Path | None = None) -> dict[str, tuple[ArrayDataset, ArrayDataset]]:
    """:func:`flamby_heart` for every hospital, in :data:`~fedloom.data.heart_disease.HOSPITALS` order."""
    return {h: flamby_heart(h, data_dir) for h in HOSPITALS}
