"""PartitionedDataset and the FederatedDataset protocol."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedloom.core.errors import DataError
from fedloom.data import ArrayDataset, FederatedDataset, PartitionedDataset, synthetic_fedprox

# Labels 0 0 1 2 2 2 0; row i has features [i, -i].
LABELS = [0, 0, 1, 2, 2, 2, 0]


def base() -> ArrayDataset:
    n = len(LABELS)
    x = torch.stack([torch.arange(n), -torch.arange(n)], dim=1).to(torch.float32)
    return ArrayDataset(x, torch.tensor(LABELS), 4)


def fed() -> PartitionedDataset:
    return PartitionedDataset(base(), [np.array([0, 1, 2]), np.array([3, 4, 5]), np.array([6]), np.array([])])


def test_implements_protocol() -> None:
    assert isinstance(fed(), FederatedDataset)
    assert isinstance(synthetic_fedprox(0.5, 0.5, seed=0, num_clients=2), FederatedDataset)


def test_sizes_and_client_data() -> None:
    f = fed()
    assert f.num_clients == 4
    assert f.client_sizes().tolist() == [3, 3, 1, 0]
    assert [f.client_size(c) for c in range(4)] == [3, 3, 1, 0]
    d = f.client_data(1)
    assert d.x[:, 0].tolist() == [3.0, 4.0, 5.0]
    assert d.y.tolist() == [2, 2, 2]
    assert d.num_classes == 4
    assert len(f.client_data(3)) == 0


def test_label_histograms_hand_computed() -> None:
    expected = [[2, 1, 0, 0], [0, 0, 3, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert fed().label_histograms().tolist() == expected
    assert fed().label_histograms(5).shape == (4, 5)
    with pytest.raises(DataError, match="num_classes=2"):
        fed().label_histograms(2)


@pytest.mark.parametrize("cid", [4, -1, 100])
def test_unknown_client_id_names_id_and_range(cid: int) -> None:
    with pytest.raises(DataError, match=rf"unknown client id {cid}: valid ids are 0\.\.3"):
        fed().client_data(cid)
    with pytest.raises(DataError, match=r"valid ids are 0\.\.3"):
        fed().client_size(cid)


def test_non_integer_client_id_is_rejected() -> None:
    with pytest.raises(DataError, match="must be an integer"):
        fed().client_data(True)


def test_numpy_integer_client_id_is_accepted() -> None:
    assert fed().client_size(np.int64(2)) == 1  # type: ignore[arg-type]


def test_indices_are_copied_not_aliased() -> None:
    idx = np.array([0, 1])
    f = PartitionedDataset(base(), [idx])
    idx[0] = 6
    assert f.client_data(0).y.tolist() == [0, 0]
    sizes = f.client_sizes()
    sizes[0] = 99
    assert f.client_size(0) == 2


def test_bad_indices_are_all_reported() -> None:
    with pytest.raises(DataError) as info:
        PartitionedDataset(base(), [np.array([0, 7]), np.array([[1]]), np.array([-1])])
    text = str(info.value)
    assert "client 0" in text
    assert "client 1" in text
    assert "client 2" in text


def test_no_clients_is_an_error() -> None:
    with pytest.raises(DataError, match="at least one client"):
        PartitionedDataset(base(), [])
