"""A very large population of clients whose data is generated on demand.

:class:`LazyPopulation` registers ``num_clients`` clients (a million is fine)
and holds nothing per client: a client's size and examples are drawn from
``numpy_rng(seed, "population", client=cid)`` when asked for. Each client is a
small classification task: ``n_k`` examples (``min_size .. max_size``) of
``dim`` Gaussian features around a client-specific shift, labelled by a shared
random linear model (so one global model can fit everyone). Memory is bounded
by the clients being trained, never by the population; drawing a cohort
(:func:`~fedloom.sim.sampling.sample_clients`) under a fiftieth of the
population costs O(cohort) (NumPy's set-based draw without replacement).

:meth:`LazyPopulation.held_out` pools the data of clients outside the
population, drawn by the same generator from the stream
``numpy_rng(seed, "population-held-out", client=i)``: a test set of unseen
clients for the experiment file's ``data.dataset = "population"``.

It implements :class:`~fedloom.data.federated.FederatedDataset`; the
``client_sizes()`` array is the one O(population) method (8 MB and a Python
loop for 10^6; nothing in a simulation round calls it).
"""

from __future__ import annotations

import numpy as np
import torch

from fedloom.core.errors import DataError
from fedloom.core.rng import numpy_rng
from fedloom.data.datasets import ArrayDataset
from fedloom.data.federated import check_client_id

__all__ = ["LazyPopulation"]


class LazyPopulation:
    """``num_clients`` clients with lazily generated data (see the module docstring)."""

    def __init__(
        self,
        num_clients: int,
        *,
        seed: int,
        dim: int = 60,
        num_classes: int = 10,
        min_size: int = 10,
        max_size: int = 100,
    ) -> None:
        problems = []
        if num_clients < 1:
            problems.append(f"num_clients must be >= 1, got {num_clients}")
        if not 1 <= min_size <= max_size:
            problems.append(f"need 1 <= min_size <= max_size, got {min_size} and {max_size}")
        if dim < 1 or num_classes < 2:
            problems.append(f"need dim >= 1 and num_classes >= 2, got {dim} and {num_classes}")
        if problems:
            raise DataError("invalid LazyPopulation:\n" + "\n".join(f"  - {p}" for p in problems))
        self._n, self.seed, self.dim, self.num_classes = num_clients, seed, dim, num_classes
        self.min_size, self.max_size = min_size, max_size
        shared = numpy_rng(seed, "population-model")
        self._w = shared.normal(0.0, 1.0, (dim, num_classes))  # (dim, classes), shared labeller

    @property
    def num_clients(self) -> int:
        return self._n

    def _rng(self, cid: int) -> np.random.Generator:
        return numpy_rng(self.seed, "population", client=cid)

    def client_size(self, cid: int) -> int:
        cid = check_client_id(cid, self._n)
        return int(self._rng(cid).integers(self.min_size, self.max_size + 1))

    def client_sizes(self) -> np.ndarray:
        return np.array([self.client_size(c) for c in range(self._n)], dtype=np.int64)

    def _generate(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        n = int(rng.integers(self.min_size, self.max_size + 1))  # first draw: the size
        shift = rng.normal(0.0, 1.0, self.dim)  # (dim,) client feature shift
        x = (rng.standard_normal((n, self.dim)) + shift).astype(np.float32)  # (n, dim)
        y = np.argmax(x @ self._w, axis=1).astype(np.int64)  # (n,)
        return x, y

    def client_data(self, cid: int) -> ArrayDataset:
        cid = check_client_id(cid, self._n)
        x, y = self._generate(self._rng(cid))
        return ArrayDataset(torch.from_numpy(x), torch.from_numpy(y), self.num_classes)

    def held_out(self, num_clients: int) -> ArrayDataset:
        """The pooled data of ``num_clients`` clients outside the population (a test set of unseen clients)."""
        if num_clients < 1:
            raise DataError(f"held_out needs num_clients >= 1, got {num_clients}")
        parts = [
            self._generate(numpy_rng(self.seed, "population-held-out", client=i)) for i in range(num_clients)
        ]
        x = np.concatenate([p[0] for p in parts])  # (sum n_i, dim)
        y = np.concatenate([p[1] for p in parts])  # (sum n_i,)
        return ArrayDataset(torch.from_numpy(x), torch.from_numpy(y), self.num_classes)
