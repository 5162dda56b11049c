"""The public surface of fedloom.data is exactly its __all__ (guards accidental exports)."""

from __future__ import annotations

import importlib

import fedloom.data

EXPECTED = {
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
    "sized",
    "pathological",
    "natural",
    "inner_dirichlet",
    "client_sizes",
    "default_cache_dir",
    "dirichlet",
    "download_mnist",
    "format_partition_stats",
    "iid",
    "load_fashion_mnist",
    "load_mnist",
    "load_mnist_raw",
    "load_shakespeare",
    "parse_idx",
    "partition",
    "partition_stats",
    "quantity_skew",
    "read_idx",
    "register_scheme",
    "render_partition_stats",
    "shards",
    "synthetic_fedprox",
}

MODULES = [
    "datasets",
    "download",
    "federated",
    "idx",
    "locate",
    "mnist",
    "mnist_pickle",
    "partition",
    "stats",
    "synthetic",
]


def test_all_is_exactly_the_public_api() -> None:
    assert set(fedloom.data.__all__) == EXPECTED
    assert len(fedloom.data.__all__) == len(EXPECTED)
    for name in EXPECTED:
        assert getattr(fedloom.data, name) is not None


def test_every_module_declares_resolvable_all() -> None:
    for name in MODULES:
        module = importlib.import_module(f"fedloom.data.{name}")
        for exported in module.__all__:
            assert hasattr(module, exported), f"fedloom.data.{name}.__all__ names missing {exported}"
