"""The fedloom exception tree.

Every error fedloom raises on purpose derives from :class:`FedloomError`::

    FedloomError
    ├── ConfigError          an experiment file or override is invalid
    ├── DataError            data is missing, corrupt, or cannot be partitioned as asked
    │   └── ChecksumError    a data file's digest differs from the known one
    ├── UpdateError          a client update is malformed (names, shapes, NaN/inf, norm)
    ├── TaskError            a user's task cannot be loaded or fails (factory, model, data, loss, metric)
    ├── TrainingError        training diverged (NaN/inf loss) or cannot go on
    ├── RunStateError        a run directory or its state database is unusable
    ├── ExecutorError        a simulation worker process or Ray actor died or failed
    └── SecAggError          secure aggregation failed (defined in fedloom.secagg.errors)
        ├── SecAggAbort           too many clients dropped out: no sum is released
        ├── ShareDecryptionError  a relayed share failed authentication
        └── ProtocolViolation     a message broke the protocol

Errors name the offending value and what was expected, so a user can fix them
without reading the source.
"""

from __future__ import annotations

__all__ = [
    "ChecksumError",
    "ConfigError",
    "DataError",
    "ExecutorError",
    "FedloomError",
    "RunStateError",
    "TaskError",
    "TrainingError",
    "UpdateError",
]


class FedloomError(Exception):
    """Base class of every error fedloom raises deliberately."""


class ConfigError(FedloomError):
    """An experiment configuration is invalid.

    ``problems`` lists every problem found (all are collected before raising).
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        text = "invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(text)


class DataError(FedloomError):
    """Data is missing, corrupt, or cannot be partitioned as requested."""


class ChecksumError(DataError):
    """A data file's SHA-256 digest differs from the expected one."""


class UpdateError(FedloomError):
    """A client update is malformed: wrong names/shapes/dtypes, NaN/inf or too large."""


class TaskError(FedloomError):
    """A task cannot be loaded or does not work: its import path, factory, model, data, loss or metrics."""


class TrainingError(FedloomError):
    """Training cannot continue, e.g. the loss became NaN or infinite."""


class RunStateError(FedloomError):
    """A run directory or its SQLite state database is missing or inconsistent."""


class ExecutorError(FedloomError):
    """An executor cannot go on: a worker process or actor died, or raised an unexpected error."""
