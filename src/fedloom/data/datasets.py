"""In-memory datasets.

:class:`ArrayDataset` is the one concrete dataset type of fedloom's data layer:
a pair of tensors ``x`` (inputs) and ``y`` (targets) with a shared first axis.
Any dtypes and trailing shapes are allowed -- float features, integer token
ids, float regression targets, multi-label 0/1 matrices. When ``y`` holds
class labels (an int64 vector) the dataset also knows the number of classes of
the task it belongs to; a subset keeps that number, so a client holding only
labels ``{3, 7}`` still reports ``num_classes == 10`` for MNIST. Partitioners
that split by label need such labels; everything else works on any targets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import FrozenInstanceError, dataclass
from typing import Any

import numpy as np
import torch

from fedloom.core.errors import DataError

__all__ = ["ArrayDataset"]


def _as_tensor(value: Any, name: str, problems: list[str]) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    problems.append(f"{name} must be a torch.Tensor or numpy array, got {type(value).__name__}")
    return None


@dataclass(frozen=True)
class ArrayDataset:
    """Inputs and targets held as two tensors with a shared first axis.

    Attributes:
        x: tensor of shape ``(N, ...)``, one row per example, any dtype (numpy
            arrays are viewed as tensors without a copy).
        y: tensor of shape ``(N, ...)``, any dtype: int64 ``(N,)`` class labels,
            float ``(N,)`` or ``(N, k)`` regression targets, ``(N, k)`` multi-label
            indicators, ``(N, T)`` next-token ids.
        num_classes: for class labels (int64 ``(N,)``), the number of classes of
            the task; ``0`` (the default) infers ``max(y) + 1``. For other targets
            it must be ``0`` and stays ``0``.

    Raises:
        DataError: at construction, listing every problem found (wrong types,
            mismatched lengths, labels out of range).

    The tensors are not copied: the dataset is a view of the caller's data and
    must not be mutated through ``x`` or ``y``.
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int = 0

    def __post_init__(self) -> None:
        problems: list[str] = []
        x = _as_tensor(self.x, "x", problems)
        y = _as_tensor(self.y, "y", problems)
        if x is not None and x.ndim < 1:
            problems.append(f"x must have shape (N, ...), got a scalar of dtype {x.dtype}")
        if y is not None and y.ndim < 1:
            problems.append(f"y must have shape (N, ...), got a scalar of dtype {y.dtype}")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            problems.append(f"num_classes must be an int >= 0 (0 = infer), got {self.num_classes!r}")
        if problems or x is None or y is None:
            raise DataError("invalid ArrayDataset:\n" + "\n".join(f"  - {p}" for p in problems))
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)
        n_x, n_y = x.shape[0], y.shape[0]
        if n_x != n_y:
            raise DataError(f"invalid ArrayDataset: x has {n_x} rows but y has {n_y}; they must be equal")
        if not self.is_classification:
            if self.num_classes != 0:
                raise DataError(
                    f"invalid ArrayDataset: num_classes = {self.num_classes} needs int64 class labels of "
                    f"shape (N,), but y is {y.dtype} {tuple(y.shape)}"
                )
            return
        if n_y == 0:
            return
        lo, hi = int(y.min()), int(y.max())
        if self.num_classes == 0:
            object.__setattr__(self, "num_classes", hi + 1)
        if lo < 0 or hi >= self.num_classes:
            raise DataError(
                f"invalid ArrayDataset: labels span [{lo}, {hi}] but must lie in [0, {self.num_classes}); "
                "pass the task's num_classes or fix the labels"
            )

    @property
    def is_classification(self) -> bool:
        """True when ``y`` holds class labels: an int64 vector."""
        return self.y.dtype == torch.int64 and self.y.ndim == 1

    @classmethod
    def from_examples(
        cls,
        examples: Sequence[Any],
        *,
        collate: Callable[[list[Any]], tuple[Any, Any]] | None = None,
        num_classes: int = 0,
    ) -> ArrayDataset:
        """Materialise a map-style dataset (a torch ``Dataset``, a list of ``(x, y)`` pairs).

        ``collate`` turns the list of all examples into ``(x, y)`` batch tensors;
        the default stacks the examples' inputs and targets with
        ``torch.utils.data.default_collate``.
        """
        items = [examples[i] for i in range(len(examples))]
        if collate is None:
            from torch.utils.data import default_collate

            try:
                batch = default_collate(items)
            except (TypeError, RuntimeError) as exc:
                raise DataError(f"cannot stack the examples into tensors ({exc}); pass collate=") from exc
        else:
            batch = collate(items)
        if not isinstance(batch, tuple | list) or len(batch) != 2:
            raise DataError(f"collate must return (x, y), got {type(batch).__name__}")
        x, y = batch
        return cls(torch.as_tensor(x), torch.as_tensor(y), num_classes)

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

    def batch(self, idx: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """The examples at ``idx`` (int64 row numbers, or a slice) as ``(x, y)``."""
        return self.x[idx], self.y[idx]

    def compact(self) -> ArrayDataset:
        """This dataset in tensors of its own: a view (see :meth:`rows`) is gathered and no longer
        keeps the dataset it was taken from alive; any other dataset is returned as it is."""
        return self

    def rows(self, rows: torch.Tensor) -> ArrayDataset:
        """The examples at ``rows`` (int64 row numbers the caller has already checked to be in range).

        :meth:`subset` without its checks, for row sets validated once (a partition's clients).
        The result is a view: its :meth:`batch` gathers a batch's rows from this dataset, and
        ``x`` and ``y`` are gathered in full only when first read. A client trained by
        fedloom's own loop therefore never holds a copy of its data.
        """
        return _Rows(self, rows)


class _Rows(ArrayDataset):
    """``base``'s examples at ``rows``: an :class:`ArrayDataset` whose ``x`` and ``y`` are gathered
    on first read, and whose batches are gathered from ``base`` directly (the same values)."""

    _base: ArrayDataset
    _rows: torch.Tensor

    def __new__(
        cls, base: ArrayDataset | None = None, rows: torch.Tensor | None = None, **fields: Any
    ) -> Any:
        if fields:  # dataclasses.replace(view, ...) builds the plain dataset it describes
            return ArrayDataset(**fields)
        return super().__new__(cls)

    def __init__(self, base: ArrayDataset, rows: torch.Tensor) -> None:
        if isinstance(base, _Rows):  # a view of a view indexes the first base
            rows = base._rows[rows]
            base = base._base
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_rows", rows)
        object.__setattr__(self, "num_classes", base.num_classes)

    def __getattr__(self, name: str) -> Any:
        # Called only where normal lookup fails: ``x`` or ``y`` before their first read.
        if name in ("x", "y"):
            full = getattr(self._base, name).index_select(0, self._rows)
            object.__setattr__(self, name, full)
            return full
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __len__(self) -> int:
        return int(self._rows.shape[0])

    @property
    def is_classification(self) -> bool:
        return self._base.is_classification

    def batch(self, idx: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._rows[idx]
        return self._base.x[rows], self._base.y[rows]

    def compact(self) -> ArrayDataset:
        return ArrayDataset(self.x, self.y, self.num_classes)

    def __reduce__(self) -> tuple[Any, ...]:  # pickled (to another process) as the plain dataset it is
        return (ArrayDataset, (self.x, self.y, self.num_classes))
