"""ArrayDataset: validation at construction and subset semantics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedloom.core.errors import DataError
from fedloom.data import ArrayDataset


def make(n: int = 6, num_classes: int = 0) -> ArrayDataset:
    x = torch.arange(n * 2, dtype=torch.float32).reshape(n, 2)
    y = torch.tensor([i % 3 for i in range(n)], dtype=torch.int64)
    return ArrayDataset(x, y, num_classes)


def test_len_and_inferred_num_classes() -> None:
    ds = make()
    assert len(ds) == 6
    assert ds.num_classes == 3  # labels 0..2


def test_explicit_num_classes_is_kept() -> None:
    assert make(num_classes=10).num_classes == 10


def test_mismatched_lengths_raise() -> None:
    with pytest.raises(DataError, match="x has 3 rows but y has 2"):
        ArrayDataset(torch.zeros(3, 2), torch.zeros(2, dtype=torch.int64))


def test_all_type_problems_are_listed() -> None:
    with pytest.raises(DataError) as info:
        ArrayDataset([[0.0]], "labels", -1)  # type: ignore[arg-type]
    text = str(info.value)
    assert "x must be a torch.Tensor or numpy array, got list" in text
    assert "y must be a torch.Tensor or numpy array, got str" in text
    assert "num_classes must be an int >= 0" in text


@pytest.mark.parametrize(
    ("x", "y"),
    [
        (torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, dtype=torch.int32)),  # any dtypes
        (torch.zeros(3, 5, dtype=torch.int64), torch.zeros(3, 5, dtype=torch.int64)),  # token ids
        (np.zeros((3, 4), dtype=np.float32), np.zeros(3, dtype=np.float32)),  # regression targets
        (torch.zeros(3, 4), torch.zeros(3, 6)),  # multi-label indicators
    ],
)
def test_non_label_targets_are_accepted_without_classes(x: object, y: object) -> None:
    ds = ArrayDataset(x, y)  # type: ignore[arg-type]
    assert len(ds) == 3
    assert isinstance(ds.x, torch.Tensor)
    assert not ds.is_classification
    assert ds.num_classes == 0


def test_num_classes_needs_class_labels() -> None:
    with pytest.raises(DataError, match="needs int64 class labels of shape"):
        ArrayDataset(torch.zeros(3, 2), torch.zeros(3), 2)


def test_numpy_arrays_are_viewed_not_copied() -> None:
    x = np.zeros((2, 3), dtype=np.float32)
    ds = ArrayDataset(x, np.array([0, 1]))
    x[0, 0] = 7.0
    assert ds.x[0, 0].item() == 7.0
    assert ds.num_classes == 2


def test_from_examples_stacks_a_map_style_dataset() -> None:
    pairs = [(torch.tensor([float(i), 1.0]), i % 2) for i in range(5)]
    ds = ArrayDataset.from_examples(pairs)
    assert ds.x.shape == (5, 2)
    assert ds.y.tolist() == [0, 1, 0, 1, 0]
    assert ds.num_classes == 2
    custom = ArrayDataset.from_examples(
        ["ab", "cd"],
        collate=lambda items: (torch.tensor([[ord(c) for c in s] for s in items]), torch.zeros(2)),
    )
    assert custom.x.tolist() == [[97, 98], [99, 100]]


def test_labels_outside_num_classes_raise() -> None:
    with pytest.raises(DataError, match=r"labels span \[0, 2\] but must lie in \[0, 2\)"):
        make(num_classes=2)


def test_negative_labels_raise() -> None:
    with pytest.raises(DataError, match="labels span"):
        ArrayDataset(torch.zeros(2, 1), torch.tensor([-1, 0]), 3)


def test_subset_takes_rows_in_order_and_keeps_num_classes() -> None:
    ds = make(num_classes=10)
    sub = ds.subset(np.array([4, 1, 4]))
    assert sub.x.tolist() == [[8.0, 9.0], [2.0, 3.0], [8.0, 9.0]]
    assert sub.y.tolist() == [1, 1, 1]
    assert sub.num_classes == 10


def test_subset_accepts_read_only_indices_without_warning() -> None:
    idx = np.array([0, 2], dtype=np.int64)
    idx.flags.writeable = False
    assert make().subset(idx).y.tolist() == [0, 2]  # warnings are errors in this suite


def test_subset_copies() -> None:
    ds = make()
    sub = ds.subset(np.array([0]))
    sub.x[0, 0] = 100.0
    assert ds.x[0, 0].item() == 0.0


def test_empty_subset() -> None:
    sub = make(num_classes=3).subset(np.array([], dtype=np.int64))
    assert len(sub) == 0
    assert sub.x.shape == (0, 2)
    assert sub.num_classes == 3


@pytest.mark.parametrize("bad", [np.array([6]), np.array([-1]), np.array([[0]]), np.array([0.5])])
def test_subset_rejects_bad_indices(bad: np.ndarray) -> None:
    with pytest.raises(DataError):
        make().subset(bad)
