"""Tasks: the user's model, data, loss, optimiser, training loop and metrics (see :mod:`fedloom.tasks.task`)."""

from fedloom.tasks.builtin import (
    config_task,
    fashion_mnist_task,
    heart_disease_task,
    mnist_task,
    population_task,
    shakespeare_task,
    synthetic_task,
)
from fedloom.tasks.loading import load_dataset_task, load_task
from fedloom.tasks.task import (
    CentralData,
    ClientData,
    Materialised,
    PartitionSpec,
    Task,
    TaskData,
    check_task,
    materialise,
)

__all__ = [
    "CentralData",
    "ClientData",
    "Materialised",
    "PartitionSpec",
    "Task",
    "TaskData",
    "check_task",
    "config_task",
    "fashion_mnist_task",
    "heart_disease_task",
    "load_dataset_task",
    "load_task",
    "materialise",
    "mnist_task",
    "population_task",
    "shakespeare_task",
    "synthetic_task",
]
