"""Federated algorithms as pure functions over explicit state."""

from fedloom.algorithms.aggregate import weighted_mean
from fedloom.algorithms.api import (
    Aggregate,
    Algorithm,
    Broadcast,
    ClientContext,
    ClientState,
    ClientUpdate,
    ServerContext,
    ServerState,
    Workspace,
)
from fedloom.algorithms.fedavg import FedAvg
from fedloom.algorithms.fednova import FedNova
from fedloom.algorithms.fedprox import FedProx
from fedloom.algorithms.local import GradCorrection, LocalResult, LocalSGD, load_params, local_sgd
from fedloom.algorithms.plan import LocalPlan, PlannedAlgorithm, StackableCorrection, run_plan
from fedloom.algorithms.requirements import UpdateRequirements
from fedloom.algorithms.scaffold import Scaffold
from fedloom.algorithms.server_opt import ServerAdagrad, ServerAdam, ServerOptimizer, ServerSGD, ServerYogi
from fedloom.algorithms.stragglers import StragglerPlan, Stragglers

__all__ = [
    "Aggregate",
    "Algorithm",
    "Broadcast",
    "ClientContext",
    "ClientState",
    "ClientUpdate",
    "FedAvg",
    "FedNova",
    "FedProx",
    "GradCorrection",
    "LocalPlan",
    "LocalResult",
    "LocalSGD",
    "PlannedAlgorithm",
    "Scaffold",
    "ServerAdagrad",
    "ServerAdam",
    "ServerContext",
    "ServerOptimizer",
    "ServerSGD",
    "ServerState",
    "ServerYogi",
    "StackableCorrection",
    "StragglerPlan",
    "Stragglers",
    "UpdateRequirements",
    "Workspace",
    "load_params",
    "local_sgd",
    "run_plan",
    "weighted_mean",
]
