"""Federated datasets: data split across numbered clients.

A federated dataset is anything satisfying the :class:`FederatedDataset`
protocol: clients are numbered ``0 .. num_clients - 1``, each client's size is
cheap to ask for, and :meth:`~FederatedDataset.client_data` materialises one
client's examples on demand. Runtimes only ever hold the data of the clients
they are training, so memory stays bounded by the cohort, not the federation.

:class:`PartitionedDataset` is the usual implementation: one shared base
:class:`~fedloom.data.datasets.ArrayDataset` plus an index array per client (as
produced by :mod:`fedloom.data.partition`). It caches nothing; ``client_data``
returns a view of the client's rows (:meth:`~fedloom.data.datasets.ArrayDataset.rows`):
training reads it batch by batch through ``batch(idx)``, which gathers only that
batch's rows from the base, and ``x``/``y`` are gathered when first read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from fedloom.core.errors import DataError
from fedloom.data.datasets import ArrayDataset

__all__ = ["FederatedDataset", "NaturalDataset", "PartitionedDataset", "check_client_id"]


@runtime_checkable
class FederatedDataset(Protocol):
    """Read-only access to the data of ``num_clients`` clients.

    Contract for implementations:
      * ``client_sizes()[cid] == client_size(cid) == len(client_data(cid))``;
      * ``client_data(cid)`` is deterministic: repeated calls return equal data;
      * an id outside ``[0, num_clients)`` raises :class:`DataError`.
    """

    @property
    def num_clients(self) -> int:
        """Number of clients; ids are ``0 .. num_clients - 1``."""
        ...

    def client_size(self, cid: int) -> int:
        """Number of examples held by client ``cid``."""
        ...

    def client_sizes(self) -> np.ndarray:
        """int64 array of shape ``(num_clients,)`` with every client's size."""
        ...

    def client_data(self, cid: int) -> ArrayDataset:
        """The examples of client ``cid`` as a dataset of its own (changing it leaves the federation's unchanged)."""
        ...


def check_client_id(cid: int, num_clients: int) -> int:
    """Return ``cid`` as an int if it names a client, else raise :class:`DataError`."""
    if isinstance(cid, bool) or not isinstance(cid, int | np.integer):
        raise DataError(f"client id must be an integer, got {cid!r}")
    if not 0 <= int(cid) < num_clients:
        raise DataError(
            f"unknown client id {cid}: valid ids are 0..{num_clients - 1} ({num_clients} clients)"
        )
    return int(cid)


class PartitionedDataset:
    """Clients defined by index arrays into one shared base dataset.

    Args:
        base: the pooled data every client draws from.
        client_indices: one 1-D integer array per client with row numbers into
            ``base``. The arrays are copied (as read-only int64), so later changes
            by the caller do not leak in. Clients may be empty; overlaps are
            allowed but the partitioners in :mod:`fedloom.data.partition` never
            produce them.

    Raises:
        DataError: if there are no clients, or an index array is not 1-D
            integer or points outside ``base`` (all problems are listed).
    """

    def __init__(self, base: ArrayDataset, client_indices: Sequence[np.ndarray]) -> None:
        if len(client_indices) == 0:
            raise DataError("a PartitionedDataset needs at least one client; got an empty client_indices")
        n = len(base)
        problems: list[str] = []
        owned: list[np.ndarray] = []
        tensors: list[torch.Tensor] = []
        for cid, raw in enumerate(client_indices):
            idx = np.asarray(raw)
            if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):
                problems.append(
                    f"client {cid}: indices must be 1-D integers, got dtype {idx.dtype} shape {idx.shape}"
                )
                continue
            if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= n):
                problems.append(
                    f"client {cid}: indices span [{int(idx.min())}, {int(idx.max())}] outside [0, {n})"
                )
                continue
            rows = torch.tensor(idx, dtype=torch.int64)
            copy = rows.numpy()  # the same memory, read-only through numpy
            copy.flags.writeable = False
            owned.append(copy)
            tensors.append(rows)
        if problems:
            raise DataError("invalid client_indices:\n" + "\n".join(f"  - {p}" for p in problems))
        self._base = base
        self._indices: tuple[np.ndarray, ...] = tuple(owned)
        self._rows: tuple[torch.Tensor, ...] = tuple(tensors)  # checked above: ArrayDataset.rows
        self._sizes = np.array([len(i) for i in owned], dtype=np.int64)
        self._sizes.flags.writeable = False

    @property
    def base(self) -> ArrayDataset:
        """The shared dataset the clients index into."""
        return self._base

    @property
    def num_clients(self) -> int:
        return len(self._indices)

    @property
    def num_classes(self) -> int:
        """The base dataset's number of classes."""
        return self._base.num_classes

    def client_indices(self, cid: int) -> np.ndarray:
        """Client ``cid``'s read-only int64 row numbers into :attr:`base`."""
        return self._indices[check_client_id(cid, self.num_clients)]

    def client_size(self, cid: int) -> int:
        return int(self._sizes[check_client_id(cid, self.num_clients)])

    def client_sizes(self) -> np.ndarray:
        return self._sizes.copy()

    def client_data(self, cid: int) -> ArrayDataset:
        return self._base.rows(self._rows[check_client_id(cid, self.num_clients)])

    def label_histograms(self, num_classes: int | None = None) -> np.ndarray:
        """Per-client label counts, int64 of shape ``(num_clients, num_classes)``.

        Args:
            num_classes: number of columns; defaults to the base's ``num_classes``.

        Raises:
            DataError: if a label is ``>= num_classes``.
        """
        k = self._base.num_classes if num_classes is None else num_classes
        labels = self._base.y.numpy()
        if labels.size and int(labels.max()) >= k:
            raise DataError(
                f"labels go up to {int(labels.max())} but num_classes={k}; pass a larger num_classes"
            )
        out = np.zeros((self.num_clients, k), dtype=np.int64)
        for cid, idx in enumerate(self._indices):
            out[cid] = np.bincount(labels[idx], minlength=k)
        return out


class NaturalDataset:
    """Clients that come with their own data (a hospital, a writer, a device).

    Args:
        clients: one :class:`~fedloom.data.datasets.ArrayDataset` per client, in
            client-id order. They are held, not copied.
        names: optional client names (e.g. the hospitals'), one per client.

    Raises:
        DataError: if there are no clients, a client is not an ArrayDataset, or
            the names do not match the clients one to one.
    """

    def __init__(self, clients: Sequence[ArrayDataset], names: Sequence[str] | None = None) -> None:
        if len(clients) == 0:
            raise DataError("a NaturalDataset needs at least one client")
        bad = [i for i, c in enumerate(clients) if not isinstance(c, ArrayDataset)]
        if bad:
            raise DataError(f"clients {bad} are not ArrayDataset (got {type(clients[bad[0]]).__name__})")
        if names is not None and len(names) != len(clients):
            raise DataError(f"{len(names)} names for {len(clients)} clients; give one name per client")
        self._clients = tuple(clients)
        self.names = tuple(names) if names is not None else tuple(str(i) for i in range(len(clients)))
        self._sizes = np.array([len(c) for c in clients], dtype=np.int64)
        self._sizes.flags.writeable = False

    @property
    def num_clients(self) -> int:
        return len(self._clients)

    def client_size(self, cid: int) -> int:
        return int(self._sizes[check_client_id(cid, self.num_clients)])

    def client_sizes(self) -> np.ndarray:
        return self._sizes.copy()

    def client_data(self, cid: int) -> ArrayDataset:
        return self._clients[check_client_id(cid, self.num_clients)]
