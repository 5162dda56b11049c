"""How a process loads its own data: a client's training set, the server's test set.

A data spec is one of::

    task              the task's own data: the client named like this one (natural
                      per-client data), or partition ``partition_client`` of a central set
    config            the experiment's own dataset ([data] section) -- client: partition
                      ``partition_client`` of it; server: its central test set
    FILE.py:ARG       a loader file (e.g. examples/heart_disease/heart_data.py:cleveland)
    package.mod:ARG   the same, as an importable module

A loader module defines ``load_client(arg, data_dir) -> ArrayDataset`` (a client's
training data) and may define ``load_eval(arg, data_dir) -> ArrayDataset`` (a test
set: the server's central one, or a site's own for evaluation rounds). The data stays
where it is; nothing is copied.

A client's test split for evaluation rounds (``fedloom client --eval-data``,
:func:`client_test_data`): ``auto`` (the default) is the task's own test split of this
client with ``--data task`` (per-client test data, e.g. FLamby's per-hospital splits), the
loader's ``load_eval(ARG)`` with ``--data FILE.py:ARG`` when the loader defines it, else
none; ``none`` turns it off; ``task`` or a loader spec names it explicitly.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from fedloom.config.schema import ExperimentConfig
from fedloom.core.errors import DataError
from fedloom.data.datasets import ArrayDataset
from fedloom.data.federated import FederatedDataset
from fedloom.sim.build import split_for, task_for
from fedloom.tasks.task import ClientData, Task, load_data, materialise

__all__ = ["client_test_data", "load_client_data", "load_eval_data", "task_client_data", "task_client_test"]


def _loader(spec: str) -> tuple[ModuleType, str]:
    target, sep, arg = spec.rpartition(":")
    if not sep or not target:
        raise DataError(f"data spec {spec!r}: expected 'config', 'FILE.py:ARG' or 'package.module:ARG'")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise DataError(f"data spec {spec!r}: loader file {path} does not exist")
        mspec = importlib.util.spec_from_file_location(f"fedloom_loader_{path.stem}", path)
        if mspec is None or mspec.loader is None:
            raise DataError(f"data spec {spec!r}: cannot load {path}")
        module = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise DataError(f"data spec {spec!r}: cannot import {target!r} ({exc})") from None
    return module, arg


def task_client_data(
    task: Task, cfg: ExperimentConfig, *, name: str, partition_client: int | None
) -> ArrayDataset:
    """This client's training data from its task: by ``name`` among natural per-client data
    (or by ``partition_client``), or partition ``partition_client`` of a central dataset."""
    data = load_data(task)
    if isinstance(data, ClientData):
        names = list(data.names) if data.names is not None else None
        if partition_client is not None:
            idx = partition_client
        elif names is not None and name in names:
            idx = names.index(name)
        else:
            known = ", ".join(names) if names is not None else "none (the task names no clients)"
            raise DataError(
                f"task {task.name!r}: no client named {name!r} (known: {known}); pass --partition-client K"
            )
        clients = data.train
        count = clients.num_clients if isinstance(clients, FederatedDataset) else len(clients)
        if not 0 <= idx < count:
            raise DataError(f"task {task.name!r}: client index {idx} is outside [0, {count})")
        # compact: a long-lived client process keeps its own rows, not the data they were taken from
        return clients.client_data(idx).compact() if isinstance(clients, FederatedDataset) else clients[idx]
    if partition_client is None:
        raise DataError(
            f"task {task.name!r} has one central dataset: pass --partition-client K (which partition is this client's)"
        )
    train = materialise(task, seed=cfg.seed, split=split_for(cfg)).train
    if not 0 <= partition_client < train.num_clients:
        raise DataError(f"--partition-client {partition_client} is outside [0, {train.num_clients})")
    return train.client_data(partition_client).compact()


def task_client_test(
    task: Task, cfg: ExperimentConfig, *, name: str, partition_client: int | None
) -> ArrayDataset | None:
    """This client's own test split from its task (by ``name``, or ``partition_client``, among
    natural per-client data); ``None`` when the task has no per-client test data."""
    data = load_data(task)
    if not isinstance(data, ClientData) or data.client_test is None:
        return None
    names = list(data.names) if data.names is not None else None
    if partition_client is not None:
        idx = partition_client
    elif names is not None and name in names:
        idx = names.index(name)
    else:
        return None
    tests = data.client_test
    count = tests.num_clients if isinstance(tests, FederatedDataset) else len(tests)
    if not 0 <= idx < count:
        return None
    return tests.client_data(idx).compact() if isinstance(tests, FederatedDataset) else tests[idx]


def client_test_data(
    spec: str,
    train_spec: str,
    task: Task,
    cfg: ExperimentConfig,
    *,
    name: str,
    data_dir: Path | None,
    partition_client: int | None,
) -> ArrayDataset | None:
    """The test split the client started with ``--eval-data spec --data train_spec`` evaluates on
    (see the module docstring); ``None``: this client has none."""
    if spec == "none":
        return None
    if spec == "auto":
        if train_spec == "task":
            return task_client_test(task, cfg, name=name, partition_client=partition_client)
        if train_spec == "config":
            return None
        module, arg = _loader(train_spec)
        fn = getattr(module, "load_eval", None)
        return _checked(fn(arg, data_dir), train_spec) if fn is not None else None
    if spec == "task":
        test = task_client_test(task, cfg, name=name, partition_client=partition_client)
        if test is None:
            raise DataError(f"--eval-data task: task {task.name!r} has no test split for client {name!r}")
        return test
    module, arg = _loader(spec)
    fn = getattr(module, "load_eval", None)
    if fn is None:
        raise DataError(f"data spec {spec!r}: the loader defines no load_eval(arg, data_dir)")
    return _checked(fn(arg, data_dir), spec)


def _checked(data: object, spec: str) -> ArrayDataset:
    if not isinstance(data, ArrayDataset):
        raise DataError(f"data spec {spec!r}: load_eval returned {type(data).__name__}, not ArrayDataset")
    return data


def load_client_data(
    spec: str, cfg: ExperimentConfig, *, data_dir: Path | None, partition_client: int | None
) -> ArrayDataset:
    """The training data of the client process started with ``--data spec`` (not ``task``)."""
    if spec == "config":
        from fedloom.sim.build import materialise_config

        if partition_client is None:
            raise DataError("--data config needs --partition-client K (which partition is this client's)")
        train = materialise_config(cfg).train
        if not 0 <= partition_client < train.num_clients:
            raise DataError(f"--partition-client {partition_client} is outside [0, {train.num_clients})")
        return train.client_data(partition_client).compact()
    module, arg = _loader(spec)
    fn = getattr(module, "load_client", None)
    if fn is None:
        raise DataError(f"data spec {spec!r}: the loader defines no load_client(arg, data_dir)")
    data = fn(arg, data_dir)
    if not isinstance(data, ArrayDataset):
        raise DataError(f"data spec {spec!r}: load_client returned {type(data).__name__}, not ArrayDataset")
    return data


def load_eval_data(
    spec: str, cfg: ExperimentConfig, *, data_dir: Path | None, search: Sequence[Path] = ()
) -> ArrayDataset:
    """The server's central test set for ``--eval-data spec`` (``task``: the task's own test set)."""
    if spec == "task":
        test = load_data(task_for(cfg, search=search)).test
        if test is None:
            raise DataError("--eval-data task: the experiment's task has no central test set")
        return test
    if spec == "config":
        from fedloom.sim.build import materialise_config

        test = materialise_config(cfg).test
        if test is None:
            raise DataError("--eval-data config: the experiment's task has no central test set")
        return test
    module, arg = _loader(spec)
    fn = getattr(module, "load_eval", None)
    if fn is None:
        raise DataError(f"data spec {spec!r}: the loader defines no load_eval(arg, data_dir)")
    data = fn(arg, data_dir)
    if not isinstance(data, ArrayDataset):
        raise DataError(f"data spec {spec!r}: load_eval returned {type(data).__name__}, not ArrayDataset")
    return data
