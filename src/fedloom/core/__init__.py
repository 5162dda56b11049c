"""Core types: parameters, random-stream derivation, errors and serialisation."""

from fedloom.core.errors import (
    ChecksumError,
    ConfigError,
    DataError,
    ExecutorError,
    FedloomError,
    RunStateError,
    TrainingError,
    UpdateError,
)
from fedloom.core.params import Params
from fedloom.core.rng import derive_seed, numpy_rng, torch_rng

__all__ = [
    "ChecksumError",
    "ConfigError",
    "DataError",
    "ExecutorError",
    "FedloomError",
    "Params",
    "RunStateError",
    "TrainingError",
    "UpdateError",
    "derive_seed",
    "numpy_rng",
    "torch_rng",
]
