"""Data poisoning in simulation: label flipping on the malicious clients' data.

:func:`flip_labels` maps every label ``y`` to ``C - 1 - y`` (``C`` classes; on
MNIST 0<->9, 1<->8, ...), the targeted-confusion attack of Fang et al. 2020
(arXiv 1911.11815) and Tolpegin et al. 2020 (arXiv 2007.08432).
:class:`LabelFlippedDataset` wraps a federated dataset so that the malicious
clients train on flipped labels and everyone else on their own data; pass it
as ``Components.train``.

Notes
-----
The attackers train honestly on poisoned data, so their updates look like
ordinary updates (norms and directions in the benign range); distance-based
defences see little. The central test set is never touched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedloom.data.datasets import ArrayDataset
from fedloom.data.federated import FederatedDataset

__all__ = ["LabelFlippedDataset", "flip_labels"]


def flip_labels(data: ArrayDataset) -> ArrayDataset:
    """A new dataset with labels ``num_classes - 1 - y`` (features shared, not copied)."""
    return ArrayDataset(data.x, data.num_classes - 1 - data.y, data.num_classes)


@dataclass(frozen=True)
class LabelFlippedDataset:
    """``base`` with the labels of the clients in ``malicious`` flipped by :func:`flip_labels`."""

    base: FederatedDataset
    malicious: frozenset[int]

    @property
    def num_clients(self) -> int:
        return self.base.num_clients

    def client_size(self, cid: int) -> int:
        return self.base.client_size(cid)

    def client_sizes(self) -> np.ndarray:
        return self.base.client_sizes()

    def client_data(self, cid: int) -> ArrayDataset:
        data = self.base.client_data(cid)
        return flip_labels(data) if cid in self.malicious else data
