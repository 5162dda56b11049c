"""FedProx's Synthetic(alpha, beta) federated dataset (Li et al. 2020, arXiv 1812.06127, §5.1).

Per device ``k`` (following the authors' generator script):

* size ``n_k = floor(LogNormal(4, 2)) + 50`` (optionally capped);
* ``u_k ~ N(0, alpha)``, ``B_k ~ N(0, beta)``;
* ``W_k ~ N(u_k, 1)`` of shape ``(dim, num_classes)``, ``b_k ~ N(u_k, 1)`` of shape ``(num_classes,)``;
* ``v_k ~ N(B_k, 1)`` elementwise, shape ``(dim,)``;
* ``x ~ N(v_k, Sigma)`` with diagonal ``Sigma_jj = j^-1.2`` (``j = 1..dim``);
* ``y = argmax(softmax(x W_k + b_k))``.

As in the authors' code, the second argument of ``N(., .)`` for ``alpha`` and
``beta`` is used as a standard deviation, and ``Sigma`` as a covariance.
``alpha`` controls how much local models differ, ``beta`` how much local inputs
differ. Synthetic-IID (``iid=True``, which requires ``alpha = beta = 0``) shares
one ``W, b ~ N(0, 1)`` across devices and uses ``v_k = 0``.

Each device's examples are split into a train part (the first
``floor(train_fraction * n_k)``, default 90% as in the FedProx scripts) and a
test part (the rest). Device ``k`` is generated from ``numpy_rng(seed,
"synthetic", client=k)`` alone (plus ``numpy_rng(seed, "synthetic-global")`` for
the shared model of the IID variant), so clients are produced lazily,
independently and identically whatever order they are asked for in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from fedloom.core.errors import DataError
from fedloom.core.rng import numpy_rng
from fedloom.data.datasets import ArrayDataset
from fedloom.data.federated import check_client_id

__all__ = ["SyntheticConfig", "SyntheticDataset", "synthetic_fedprox"]

_SIZE_MU, _SIZE_SIGMA, _SIZE_MIN = 4.0, 2.0, 50

Split = Literal["train", "test"]


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of Synthetic(alpha, beta); validated at construction (all problems listed)."""

    alpha: float
    beta: float
    seed: int
    num_clients: int = 30
    dim: int = 60
    num_classes: int = 10
    iid: bool = False
    train_fraction: float = 0.9
    max_client_size: int | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not (np.isfinite(self.alpha) and self.alpha >= 0):
            problems.append(f"alpha must be a finite number >= 0, got {self.alpha!r}")
        if not (np.isfinite(self.beta) and self.beta >= 0):
            problems.append(f"beta must be a finite number >= 0, got {self.beta!r}")
        if self.iid and (self.alpha != 0 or self.beta != 0):
            problems.append(
                f"Synthetic-IID is defined with alpha = beta = 0, got alpha={self.alpha}, beta={self.beta}"
            )
        if self.num_clients < 1:
            problems.append(f"num_clients must be >= 1, got {self.num_clients}")
        if self.dim < 1:
            problems.append(f"dim must be >= 1, got {self.dim}")
        if self.num_classes < 2:
            problems.append(f"num_classes must be >= 2, got {self.num_classes}")
        if not 0 < self.train_fraction < 1:
            problems.append(f"train_fraction must lie strictly between 0 and 1, got {self.train_fraction}")
        if self.max_client_size is not None and self.max_client_size < 2:
            problems.append(
                f"max_client_size must be >= 2 (one train and one test example), got {self.max_client_size}"
            )
        if problems:
            raise DataError(
                "invalid synthetic dataset parameters:\n" + "\n".join(f"  - {p}" for p in problems)
            )


def _device_rng(cfg: SyntheticConfig, cid: int) -> np.random.Generator:
    return numpy_rng(cfg.seed, "synthetic", client=cid)


def _draw_size(cfg: SyntheticConfig, rng: np.random.Generator) -> int:
    """First draw of every device stream, so sizes are known without generating data."""
    n = int(rng.lognormal(_SIZE_MU, _SIZE_SIGMA)) + _SIZE_MIN
    return n if cfg.max_client_size is None else min(n, cfg.max_client_size)


def _train_count(cfg: SyntheticConfig, n: int) -> int:
    return min(max(int(cfg.train_fraction * n), 1), n - 1)


def generate_device(cfg: SyntheticConfig, cid: int) -> tuple[np.ndarray, np.ndarray]:
    """All of device ``cid``'s examples: x float32 ``(n_k, dim)``, y int64 ``(n_k,)``."""
    rng = _device_rng(cfg, cid)
    n = _draw_size(cfg, rng)
    d, c = cfg.dim, cfg.num_classes
    if cfg.iid:
        shared = numpy_rng(cfg.seed, "synthetic-global")
        w = shared.normal(0.0, 1.0, (d, c))
        b = shared.normal(0.0, 1.0, c)
        v = np.zeros(d)
    else:
        u = rng.normal(0.0, cfg.alpha)
        big_b = rng.normal(0.0, cfg.beta)
        w = rng.normal(u, 1.0, (d, c))  # (dim, classes)
        b = rng.normal(u, 1.0, c)  # (classes,)
        v = rng.normal(big_b, 1.0, d)  # (dim,)
    std = np.arange(1, d + 1, dtype=np.float64) ** -0.6  # sqrt of Sigma_jj = j^-1.2
    x = v + rng.standard_normal((n, d)) * std  # (n, dim)
    y = np.argmax(x @ w + b, axis=1)  # softmax is monotone: argmax of the logits
    return x.astype(np.float32), y.astype(np.int64)


class SyntheticDataset:
    """The train or test side of a Synthetic(alpha, beta) federation, generated on demand.

    Implements :class:`~fedloom.data.federated.FederatedDataset`. Nothing is
    cached: ``client_data`` regenerates the device (deterministically) each call.
    """

    def __init__(self, config: SyntheticConfig, split: Split = "train") -> None:
        if split not in ("train", "test"):
            raise DataError(f"split must be 'train' or 'test', got {split!r}")
        self.config = config
        self.split: Split = split
        totals = [_draw_size(config, _device_rng(config, k)) for k in range(config.num_clients)]
        train = [_train_count(config, n) for n in totals]
        sizes = train if split == "train" else [n - t for n, t in zip(totals, train, strict=True)]
        self._sizes = np.array(sizes, dtype=np.int64)

    @property
    def num_clients(self) -> int:
        return self.config.num_clients

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def client_size(self, cid: int) -> int:
        return int(self._sizes[check_client_id(cid, self.num_clients)])

    def client_sizes(self) -> np.ndarray:
        return self._sizes.copy()

    def client_data(self, cid: int) -> ArrayDataset:
        cid = check_client_id(cid, self.num_clients)
        x, y = generate_device(self.config, cid)
        cut = _train_count(self.config, len(y))
        rows = slice(0, cut) if self.split == "train" else slice(cut, None)
        # Slicing then copying keeps the tensors contiguous and independent of the full device arrays.
        return ArrayDataset(
            torch.from_numpy(x[rows].copy()), torch.from_numpy(y[rows].copy()), self.config.num_classes
        )


def synthetic_fedprox(
    alpha: float,
    beta: float,
    *,
    seed: int,
    num_clients: int = 30,
    dim: int = 60,
    num_classes: int = 10,
    iid: bool = False,
    split: Split = "train",
    train_fraction: float = 0.9,
    max_client_size: int | None = None,
) -> SyntheticDataset:
    """Synthetic(alpha, beta) of FedProx as a lazily generated federated dataset.

    ``synthetic_fedprox(1, 1, seed=0)`` is the paper's Synthetic(1,1) with 30
    devices; ``synthetic_fedprox(0, 0, seed=0, iid=True)`` is Synthetic-IID. Use the
    same arguments with ``split="test"`` for the matching held-out data.

    Raises:
        DataError: listing every invalid argument.
    """
    cfg = SyntheticConfig(
        alpha=alpha,
        beta=beta,
        seed=seed,
        num_clients=num_clients,
        dim=dim,
        num_classes=num_classes,
        iid=iid,
        train_fraction=train_fraction,
        max_client_size=max_client_size,
    )
    return SyntheticDataset(cfg, split)
