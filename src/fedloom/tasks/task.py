"""The task: what a user brings to a federation, and how fedloom materialises it.

A :class:`Task` names the model (a zero-argument factory), the data (a central
dataset that fedloom partitions with the experiment's ``[data]`` settings, or
natural per-client data), the loss, the local optimiser, the metrics, an
optional user-written training function and the device. fedloom owns the
federation around it: selection, exchange, aggregation, privacy and state.

Every runtime builds its workspace from a task with :func:`materialise`, which
also checks the task on one small batch before any round runs (the model's
forward pass, the loss's shape, every metric), so a broken task fails at once
with a :class:`~fedloom.core.errors.TaskError` naming the task and what was
wrong, never in the middle of a run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fedloom.algorithms.api import Workspace
from fedloom.algorithms.local import LocalOptimizer, TrainFn
from fedloom.core.errors import DataError, FedloomError, TaskError
from fedloom.core.params import Params
from fedloom.core.rng import derive_seed
from fedloom.data.datasets import ArrayDataset
from fedloom.data.federated import FederatedDataset, NaturalDataset, PartitionedDataset
from fedloom.data.partition import natural, partition
from fedloom.metrics import Metric, accuracy

__all__ = [
    "CentralData",
    "ClientData",
    "Materialised",
    "PartitionSpec",
    "Task",
    "TaskData",
    "build_module",
    "check_task",
    "load_data",
    "materialise",
    "task_workspace",
]

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class CentralData:
    """One pooled training set that fedloom partitions, and an optional central test set.

    ``groups`` is an optional id column (one value per training example: a
    writer, a device, a site); the ``"natural"`` partition makes one client per
    distinct value, in sorted order, named by the value.
    """

    train: ArrayDataset
    test: ArrayDataset | None = None
    source: str = ""
    groups: np.ndarray | Sequence[Any] | None = None


@dataclass(frozen=True)
class ClientData:
    """Natural per-client data: each client's training set, optionally its own test set.

    ``names`` name the clients (e.g. hospitals); ``client_test`` (one per client)
    enables per-site evaluation; ``test`` is an optional central test set.
    """

    train: Sequence[ArrayDataset] | FederatedDataset
    names: Sequence[str] | None = None
    test: ArrayDataset | None = None
    client_test: Sequence[ArrayDataset] | FederatedDataset | None = None
    source: str = ""


TaskData = CentralData | ClientData


@dataclass(frozen=True)
class Task:
    """A federated learning job as its user describes it.

    Attributes:
        model: builds the model; called with the global torch RNG seeded from the
            experiment seed, so its initial weights are reproducible.
        data: a :class:`CentralData` / :class:`ClientData`, or a zero-argument
            callable returning one (called once per process that needs data).
        loss: ``loss(outputs, targets) -> scalar tensor``; cross-entropy by default.
        optimizer: the local optimiser; plain SGD by default (its learning rate
            and schedule lengths come from the experiment's ``[client]`` section).
        metrics: name -> ``metric(outputs, targets) -> float`` (see :mod:`fedloom.metrics`).
        train: a user-written training function (see
            :class:`~fedloom.algorithms.local.TrainFn`); ``None`` uses fedloom's loop.
        device: where local training and evaluation run (``"cpu"``, ``"cuda"``...).
        name: shown in logs and errors.
    """

    model: Callable[[], nn.Module]
    data: TaskData | Callable[[], TaskData]
    loss: Loss = field(default_factory=nn.CrossEntropyLoss)
    optimizer: LocalOptimizer = field(default_factory=LocalOptimizer)
    metrics: Mapping[str, Metric] = field(default_factory=lambda: {"accuracy": accuracy})
    train: TrainFn | None = None
    device: str = "cpu"
    name: str = "task"

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not callable(self.model):
            problems.append(f"model must be a callable that builds a torch.nn.Module, got {self.model!r}")
        if not callable(self.loss):
            problems.append(f"loss must be callable, got {self.loss!r}")
        if not isinstance(self.optimizer, LocalOptimizer):
            problems.append(
                f"optimizer must be a fedloom.LocalOptimizer, got {type(self.optimizer).__name__}"
            )
        for key, metric in dict(self.metrics).items():
            if not callable(metric):
                problems.append(f"metric {key!r} is not callable ({metric!r})")
        if self.train is not None and not callable(self.train):
            problems.append(f"train must be a callable train(model, data, ctx), got {self.train!r}")
        if problems:
            raise TaskError(f"task {self.name!r}: " + "; ".join(problems))


@dataclass(frozen=True)
class PartitionSpec:
    """How a :class:`CentralData` training set is split: a scheme, its options, clients and seed."""

    scheme: str = "iid"
    num_clients: int = 10
    seed: int = 0
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Materialised:
    """A task made concrete for one process: its workspace, data and initial parameters."""

    task: Task
    workspace: Workspace
    initial_params: Params
    train: FederatedDataset
    test: ArrayDataset | None
    client_test: FederatedDataset | None
    client_names: tuple[str, ...] | None
    source: str


def build_module(task: Task, seed: int) -> nn.Module:
    """The task's model with initial weights determined only by ``seed`` (global RNG restored)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "model-init"))
        try:
            module = task.model()
        except FedloomError:
            raise
        except Exception as exc:
            raise TaskError(
                f"task {task.name!r}: its model factory raised {type(exc).__name__}: {exc}"
            ) from exc
    if not isinstance(module, nn.Module):
        raise TaskError(
            f"task {task.name!r}: its model factory returned {type(module).__name__}, not torch.nn.Module"
        )
    return module


def load_data(task: Task) -> TaskData:
    """The task's data, calling its data factory if it has one."""
    data = task.data
    if callable(data) and not isinstance(data, CentralData | ClientData):
        try:
            data = data()
        except FedloomError:
            raise
        except Exception as exc:
            raise TaskError(
                f"task {task.name!r}: its data factory raised {type(exc).__name__}: {exc}"
            ) from exc
    if not isinstance(data, CentralData | ClientData):
        raise TaskError(
            f"task {task.name!r}: data must be a fedloom.CentralData or fedloom.ClientData, "
            f"got {type(data).__name__}"
        )
    return data


def _federate(
    task: Task, data: TaskData, split: PartitionSpec
) -> tuple[FederatedDataset, FederatedDataset | None]:
    if isinstance(data, ClientData):
        train = _as_federated(data.train, data.names)
        tests = _as_federated(data.client_test, data.names) if data.client_test is not None else None
        if tests is not None and tests.num_clients != train.num_clients:
            raise TaskError(
                f"task {task.name!r}: {tests.num_clients} client test sets for {train.num_clients} clients"
            )
        return train, tests
    base = data.train
    options = dict(split.options)
    if split.scheme == "natural":
        if data.groups is None:
            raise TaskError(
                f"task {task.name!r}: partition 'natural' needs an id column; give CentralData(groups=...)"
            )
        options["groups"] = np.asarray(data.groups)
    if base.is_classification:
        labels = base.y.numpy()
    elif split.scheme in ("iid", "quantity_skew", "linear", "square", "exponential", "natural"):
        labels = np.zeros(len(base), dtype=np.int64)  # these schemes ignore labels
    else:
        raise TaskError(
            f"task {task.name!r}: partition {split.scheme!r} splits by class label, but the targets are "
            f"{base.y.dtype} {tuple(base.y.shape)}; use 'iid', 'quantity', 'linear', 'square', 'exponential' "
            "or 'natural', or natural ClientData"
        )
    try:
        indices = partition(labels, split.scheme, split.num_clients, split.seed, **options)
    except DataError as exc:
        raise TaskError(f"task {task.name!r}: {exc}") from exc
    return PartitionedDataset(base, indices), None


def _as_federated(
    clients: Sequence[ArrayDataset] | FederatedDataset, names: Sequence[str] | None
) -> FederatedDataset:
    if isinstance(clients, FederatedDataset):
        return clients
    return NaturalDataset(list(clients), names)


def task_workspace(task: Task, *, seed: int, device: str | None = None) -> tuple[Workspace, Params]:
    """The task's model (seeded) in a workspace with its training recipe, and its initial parameters.

    Needs no data: a server that only aggregates and evaluates builds just this.
    """
    module = build_module(task, seed)
    initial = Params.from_module(module)
    workspace = Workspace(
        module,
        task.loss,
        optimizer=task.optimizer,
        train_fn=task.train,
        metrics=task.metrics,
        device=device if device is not None else task.device,
    )
    return workspace, initial


def materialise(task: Task, *, seed: int, split: PartitionSpec, device: str | None = None) -> Materialised:
    """Build the task's model and data, check them on one batch, and wrap them in a workspace."""
    workspace, initial = task_workspace(task, seed=seed, device=device)
    data = load_data(task)
    train, client_test = _federate(task, data, split)
    probe_id = next((c for c in range(train.num_clients) if train.client_size(c) > 0), None)
    if probe_id is None:
        raise TaskError(f"task {task.name!r}: every client's training set is empty")
    check_task(task, workspace, train.client_data(probe_id), f"client {probe_id}'s training data")
    if data.test is not None:
        check_task(task, workspace, data.test, "the test set")
    names = tuple(data.names) if isinstance(data, ClientData) and data.names is not None else None
    if isinstance(data, CentralData) and split.scheme == "natural" and data.groups is not None:
        names = tuple(natural(np.asarray(data.groups))[1])  # the id values, in the clients' order
    return Materialised(
        task=task,
        workspace=workspace,
        initial_params=initial,
        train=train,
        test=data.test,
        client_test=client_test,
        client_names=names,
        source=data.source or task.name,
    )


def check_task(task: Task, workspace: Workspace, data: ArrayDataset, what: str) -> None:
    """Run the model, loss and metrics on up to 4 examples of ``data``; raise TaskError naming the failure."""
    n = min(len(data), 4)
    if n == 0:
        return
    xb, yb = data.batch(slice(0, n))
    xb, yb = xb.to(workspace.device), yb.to(workspace.device)
    module = workspace.module
    was_training = module.training
    module.eval()
    where = f"task {task.name!r}"
    try:
        with torch.no_grad():
            try:
                out = module(xb)
            except Exception as exc:
                raise TaskError(
                    f"{where}: the model failed on a batch of {what} (x {xb.dtype} {tuple(xb.shape)}): "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            try:
                loss = workspace.loss_fn(out, yb)
            except Exception as exc:
                raise TaskError(
                    f"{where}: the loss failed on outputs {tuple(out.shape)} and targets {yb.dtype} "
                    f"{tuple(yb.shape)} of {what}: {type(exc).__name__}: {exc}"
                ) from exc
            if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
                shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise TaskError(f"{where}: the loss returned {shape}; it must return a scalar tensor")
            for key, metric in workspace.metrics.items():
                try:
                    float(metric(out.cpu(), yb.cpu()))
                except Exception as exc:
                    raise TaskError(
                        f"{where}: metric {key!r} failed on {what}: {type(exc).__name__}: {exc}"
                    ) from exc
    finally:
        module.train(was_training)
