"""fedloom: federated learning with one algorithm API from simulation to deployment.

What a notebook or script needs is importable from here: the task types a user
writes (:class:`Task`, :class:`CentralData`, :class:`ClientData`,
:class:`LocalOptimizer`, :class:`TrainContext`), :func:`simulate`, the
algorithms and server optimisers, and configuration loading. Metric functions
are in :mod:`fedloom.metrics`.
"""

from fedloom.algorithms.fedavg import FedAvg
from fedloom.algorithms.fednova import FedNova
from fedloom.algorithms.fedprox import FedProx
from fedloom.algorithms.local import LocalOptimizer, LocalSGD, TrainContext
from fedloom.algorithms.scaffold import Scaffold
from fedloom.algorithms.server_opt import ServerAdagrad, ServerAdam, ServerSGD, ServerYogi
from fedloom.config.loader import load_config
from fedloom.config.schema import ExperimentConfig
from fedloom.core.errors import FedloomError
from fedloom.core.params import Params
from fedloom.data.datasets import ArrayDataset
from fedloom.run import History, simulate
from fedloom.tasks.loading import load_task
from fedloom.tasks.task import CentralData, ClientData, Task

__version__ = "0.1.0"

__all__ = [
    "ArrayDataset",
    "CentralData",
    "ClientData",
    "ExperimentConfig",
    "FedAvg",
    "FedNova",
    "FedProx",
    "FedloomError",
    "History",
    "LocalOptimizer",
    "LocalSGD",
    "Params",
    "Scaffold",
    "ServerAdagrad",
    "ServerAdam",
    "ServerSGD",
    "ServerYogi",
    "Task",
    "TrainContext",
    "__version__",
    "load_config",
    "load_task",
    "simulate",
]
