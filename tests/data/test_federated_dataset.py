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


def test_client_data_is_a_view_gathered_on_first_read() -> None:
    data = PartitionedDataset(base(), [np.array([5, 1, 3]), np.array([0])]).client_data(0)
    assert isinstance(data, ArrayDataset)
    assert (len(data), data.num_classes, data.is_classification) == (3, 4, True)
    assert {"x", "y"}.isdisjoint(vars(data))  # nothing gathered yet
    # A batch is gathered from the base: rows 5, 1, 3 of the base at positions 2, 0, and a slice.
    xb, yb = data.batch(torch.tensor([2, 0]))
    assert torch.equal(xb, torch.tensor([[3.0, -3.0], [5.0, -5.0]]))
    assert torch.equal(yb, torch.tensor([2, 2]))
    xs, ys = data.batch(slice(1, 3))
    assert torch.equal(xs, torch.tensor([[1.0, -1.0], [3.0, -3.0]]))
    assert torch.equal(ys, torch.tensor([0, 2]))
    assert "x" not in vars(data)
    assert torch.equal(data.x, torch.tensor([[5.0, -5.0], [1.0, -1.0], [3.0, -3.0]]))
    assert torch.equal(data.y, torch.tensor([2, 0, 2]))
    assert data.x is data.x  # gathered once
    # A plain dataset's batch is the same indexing.
    px, py = ArrayDataset(data.x, data.y, 4).batch(slice(1, 3))
    assert torch.equal(px, xs)
    assert torch.equal(py, ys)


def test_a_view_of_a_view_indexes_the_base() -> None:
    view = base().rows(torch.tensor([6, 5, 4, 3]))
    inner = view.rows(torch.tensor([3, 0]))  # rows 3 and 6 of the base
    assert torch.equal(inner.x, torch.tensor([[3.0, -3.0], [6.0, -6.0]]))
    assert torch.equal(inner.y, torch.tensor([2, 0]))


def test_a_pickled_view_carries_its_rows_only() -> None:
    import pickle

    big = ArrayDataset(torch.zeros(10_000, 8), torch.zeros(10_000, dtype=torch.int64), 2)
    view = big.rows(torch.tensor([1, 2, 3]))
    raw = pickle.dumps(view)
    assert len(raw) < 4_000  # the base is 320 kB
    back = pickle.loads(raw)
    assert type(back) is ArrayDataset
    assert torch.equal(back.x, view.x)
    assert torch.equal(back.y, view.y)
    assert back.num_classes == 2


def test_unknown_attribute_of_a_view_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'z'"):
        _ = fed().client_data(0).z  # type: ignore[attr-defined]


@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox", "scaffold-I"])
def test_training_a_view_equals_training_its_copy_and_gathers_only_batches(algorithm: str) -> None:
    from torch import nn

    from fedloom.algorithms import ClientContext, FedAvg, FedProx, LocalSGD, Scaffold, Workspace
    from fedloom.core.params import Params

    gen = torch.Generator().manual_seed(3)
    pool = ArrayDataset(torch.randn(50, 6, generator=gen), torch.randint(0, 3, (50,), generator=gen), 3)
    rows = torch.tensor([41, 7, 7, 30, 2, 19, 48, 11, 25, 3, 36])  # unsorted, one repeated
    local = LocalSGD(lr=0.1, epochs=2, batch_size=4)
    algo = {
        "fedavg": FedAvg(local=local),
        "fedprox": FedProx(local=local, mu=0.5),
        "scaffold-I": Scaffold(local=local, option="I"),
    }[algorithm]

    def update(data: ArrayDataset) -> tuple[Params, dict[str, float]]:
        torch.manual_seed(0)
        ws = Workspace(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)))
        bc = algo.broadcast(algo.server_init(Params(ws.module.state_dict()).clone()))
        upd = algo.client_update(ws, bc, None, data, ClientContext(seed=1, round=1, client_id=4))
        return upd.delta, dict(upd.metrics)

    view = pool.rows(rows)
    from_view, view_metrics = update(view)
    assert {"x", "y"}.isdisjoint(vars(view))  # fedloom's loop read batches only
    copied = ArrayDataset(pool.x.index_select(0, rows), pool.y.index_select(0, rows), 3)
    from_copy, copy_metrics = update(copied)
    assert view_metrics == copy_metrics
    assert view_metrics["train_loss"] > 0
    assert list(from_view) == list(from_copy)
    assert all(torch.equal(from_view[k], from_copy[k]) for k in from_copy)


def test_a_view_is_frozen_and_replace_gives_a_plain_dataset() -> None:
    import dataclasses

    view = base().rows(torch.tensor([4, 0]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        view.x = torch.zeros(2, 2)  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        view.extra = 1  # type: ignore[attr-defined]
    flipped = dataclasses.replace(view, y=torch.tensor([0, 2]))
    assert type(flipped) is ArrayDataset
    assert torch.equal(flipped.x, torch.tensor([[4.0, -4.0], [0.0, 0.0]]))
    assert torch.equal(flipped.y, torch.tensor([0, 2]))


def test_batch_takes_the_same_shapes_from_a_view_as_from_a_plain_dataset() -> None:
    view = base().rows(torch.tensor([6, 2, 5]))
    plain = ArrayDataset(view.x, view.y, 4)
    for idx in (1, torch.tensor(2), torch.tensor([2, 0]), slice(0, 2)):
        for got, want in zip(view.batch(idx), plain.batch(idx), strict=True):
            assert got.shape == want.shape
            assert torch.equal(got, want)


def test_compact_keeps_only_the_views_rows() -> None:
    pool = base()
    view = pool.rows(torch.tensor([3, 1]))
    own = view.compact()
    assert type(own) is ArrayDataset
    assert torch.equal(own.x, torch.tensor([[3.0, -3.0], [1.0, -1.0]]))
    assert own.x.untyped_storage().nbytes() == own.x.numel() * 4  # not a view of the pool's storage
    assert pool.compact() is pool
