"""fedloom's data layer: datasets, federated splits, partitioners and dataset loaders.

Dependency direction inside the package: ``datasets`` ← ``federated`` ←
``partition`` / ``synthetic`` / ``population`` / ``stats``; ``idx`` / ``locate`` / ``download`` /
``mnist_pickle`` ← ``mnist`` ← ``fashion_mnist``; ``shakespeare`` (LEAF's next-character task). Everything here depends only on ``fedloom.core``.
"""

from __future__ import annotations

from fedloom.data.datasets import ArrayDataset
from fedloom.data.download import MNIST_MIRRORS, Fetch, download_mnist
from fedloom.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist
from fedloom.data.federated import FederatedDataset, PartitionedDataset
from fedloom.data.idx import parse_idx, read_idx
from fedloom.data.locate import DATA_ENV_VAR, default_cache_dir
from fedloom.data.mnist import MNIST_MEAN, MNIST_STD, MnistData, MnistRaw, load_mnist, load_mnist_raw
from fedloom.data.partition import (
    available_schemes,
    client_sizes,
    dirichlet,
    iid,
    inner_dirichlet,
    natural,
    partition,
    pathological,
    quantity_skew,
    register_scheme,
    shards,
    sized,
)
from fedloom.data.shakespeare import ShakespeareData, load_shakespeare
from fedloom.data.stats import PartitionStats, format_partition_stats, partition_stats, render_partition_stats
from fedloom.data.synthetic import SyntheticConfig, SyntheticDataset, synthetic_fedprox

__all__ = [
    "DATA_ENV_VAR",
    "FASHION_MNIST_CLASSES",
    "MNIST_MEAN",
    "MNIST_MIRRORS",
    "MNIST_STD",
    "ArrayDataset",
    "FederatedDataset",
    "Fetch",
    "MnistData",
    "MnistRaw",
    "PartitionStats",
    "PartitionedDataset",
    "ShakespeareData",
    "SyntheticConfig",
    "SyntheticDataset",
    "available_schemes",
    "client_sizes",
    "default_cache_dir",
    "dirichlet",
    "download_mnist",
    "format_partition_stats",
    "iid",
    "inner_dirichlet",
    "load_fashion_mnist",
    "load_mnist",
    "load_mnist_raw",
    "load_shakespeare",
    "natural",
    "parse_idx",
    "partition",
    "partition_stats",
    "pathological",
    "quantity_skew",
    "read_idx",
    "register_scheme",
    "render_partition_stats",
    "shards",
    "sized",
    "synthetic_fedprox",
]
