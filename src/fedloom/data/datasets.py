"""In-memory labelled datasets.

:class:`ArrayDataset` is the one concrete dataset type of fedloom's data layer:
a pair of tensors ``x`` (features, float32, shape ``(N, ...)``) and ``y``
(class labels, int64, shape ``(N,)``), plus the number of classes of the task
it belongs to. A subset keeps that number, so a client holding only labels
``{3, 7}`` still reports ``num_classes == 10`` for MNIST.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedloom.core.errors import DataError

__all__ = ["ArrayDataset"]


@dataclass(frozen=True)
class ArrayDataset:
    """Features and labels held as two tensors with a shared first axis.

    Attributes:
        x: float32 tensor of shape ``(N, ...)``, one row per example.
        y: int64 tensor of shape ``(N,)`` with labels in ``[0, num_classes)``.
        num_classes: number of classes of the task. ``0`` (the default) means
            "infer it as ``max(y) + 1``" (``0`` for an empty dataset); after
            construction the field always holds the resolved value.

    Raises:
        DataError: at construction, listing every problem found (wrong types,
            dtypes, mismatched lengths, labels out of range).

    The tensors are not copied: the dataset is a view of the caller's data and
    must not be mutated through ``x`` or ``y``.
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int = 0

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not isinstance(self.x, torch.Tensor):
            problems.append(f"x must be a torch.Tensor, got {type(self.x).__name__}")
        elif self.x.dtype != torch.float32 or self.x.ndim < 1:
            problems.append(
                f"x must be float32 with shape (N, ...), got {self.x.dtype} {tuple(self.x.shape)}"
            )
        if not isinstance(self.y, torch.Tensor):
            problems.append(f"y must be a torch.Tensor, got {type(self.y).__name__}")
        elif self.y.dtype != torch.int64 or self.y.ndim != 1:
            problems.append(f"y must be int64 with shape (N,), got {self.y.dtype} {tuple(self.y.shape)}")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            problems.append(f"num_classes must be an int >= 0 (0 = infer), got {self.num_classes!r}")
        if problems:
            raise DataError("invalid ArrayDataset:\n" + "\n".join(f"  - {p}" for p in problems))
        n_x, n_y = self.x.shape[0], self.y.shape[0]
        if n_x != n_y:
            raise DataError(f"invalid ArrayDataset: x has {n_x} rows but y has {n_y}; they must be equal")
        if n_y == 0:
            return
        lo, hi = int(self.y.min()), int(self.y.max())
        if self.num_classes == 0:
            object.__setattr__(self, "num_classes", hi + 1)
        if lo < 0 or hi >= self.num_classes:
            raise DataError(
                f"invalid ArrayDataset: labels span [{lo}, {hi}] but must lie in [0, {self.num_classes}); "
                "pass the task's num_classes or fix the labels"
            )

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, indices: np.ndarray) -> ArrayDataset:
        """Return the examples at ``indices`` (in that order) as a new dataset.

        Args:
            indices: 1-D integer array of row numbers in ``[0, len(self))``.
                Repeats are allowed. The array is not modified.

        Returns:
            A dataset with fresh (copied) tensors and the same ``num_classes``.

        Raises:
            DataError: if ``indices`` is not a 1-D integer array or is out of range.
        """
        idx = np.asarray(indices)
        if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):
            raise DataError(
                f"subset indices must be a 1-D integer array, got dtype {idx.dtype} shape {idx.shape}"
            )
        n = len(self)
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise DataError(
                f"subset indices span [{int(idx.min())}, {int(idx.max())}] but the dataset has {n} rows"
            )
        # torch.tensor copies, so read-only index arrays are fine.
        t = torch.tensor(idx.astype(np.int64, copy=False), dtype=torch.int64)
        return ArrayDataset(self.x.index_select(0, t), self.y.index_select(0, t), self.num_classes)
