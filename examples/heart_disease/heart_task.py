"""The four-hospital heart-disease data as a binary-classification task: one logit, BCE, AUC.

Each hospital is a client with its own train and test split (see ``heart_data.py``
for the preprocessing); the central test set pools the four test splits, and
per-site evaluation reports every hospital's accuracy and AUC. Simulate it with
``fedloom simulate --config examples/heart_disease/heart_task.toml``; deploy it
with the same file given to ``fedloom server`` and to each ``fedloom client``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from heart_data import HOSPITALS, _prepare
from torch import nn

import fedloom
from fedloom.metrics import accuracy, auc


def _binary(ds: fedloom.ArrayDataset) -> fedloom.ArrayDataset:
    return fedloom.ArrayDataset(ds.x, ds.y.to(torch.float32))  # BCE targets are floats


def make(data_dir: str = "") -> fedloom.Task:
    """The task; ``data_dir`` holds ``processed.<hospital>.data`` (empty: the copy shipped with fedloom)."""
    where = Path(data_dir) if data_dir else None

    def data() -> fedloom.ClientData:
        train = [_binary(_prepare(h, where, "train")) for h in HOSPITALS]
        tests = [_binary(_prepare(h, where, "test")) for h in HOSPITALS]
        pooled = fedloom.ArrayDataset(torch.cat([t.x for t in tests]), torch.cat([t.y for t in tests]))
        return fedloom.ClientData(
            train=train,
            names=HOSPITALS,
            test=pooled,
            client_test=tests,
            source="UCI Heart Disease, 4 hospitals",
        )

    return fedloom.Task(
        model=lambda: nn.Linear(13, 1),
        data=data,
        loss=lambda out, y: nn.functional.binary_cross_entropy_with_logits(out.reshape(-1), y),
        metrics={"accuracy": accuracy, "auc": auc},
        name="heart-disease",
    )
