"""Turn a validated experiment config into the run's components."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedloom.aggregators.registry import make_aggregator
from fedloom.algorithms.api import Algorithm, Workspace
from fedloom.algorithms.fedavg import FedAvg
from fedloom.algorithms.fednova import FedNova
from fedloom.algorithms.fedprox import FedProx
from fedloom.algorithms.local import LocalSGD
from fedloom.algorithms.scaffold import Scaffold
from fedloom.algorithms.server_opt import ServerAdagrad, ServerAdam, ServerOptimizer, ServerSGD, ServerYogi
from fedloom.algorithms.stragglers import Stragglers
from fedloom.attacks import ALIE, GaussianAttack, LabelFlippedDataset, Scaling, SignFlip, malicious_clients
from fedloom.config.schema import DataConfig, ExperimentConfig
from fedloom.core.params import Params
from fedloom.data.datasets import ArrayDataset
from fedloom.data.federated import FederatedDataset, PartitionedDataset
from fedloom.data.mnist import load_mnist
from fedloom.data.partition import partition
from fedloom.data.synthetic import synthetic_fedprox
from fedloom.models.zoo import build_model
from fedloom.sim.privacy_plan import PrivacyPlan, plan_privacy
from fedloom.transforms.pipeline import NormClip, Pipeline, UpdateTransform

__all__ = ["Components", "build_algorithm", "build_components", "build_data", "build_pipeline"]


@dataclass(frozen=True)
class Components:
    algorithm: Algorithm
    pipeline: Pipeline
    train: FederatedDataset
    test: ArrayDataset
    workspace: Workspace
    initial_params: Params
    data_source: str
    privacy: PrivacyPlan | None = None
    adversary: ALIE | None = None


def build_algorithm(cfg: ExperimentConfig) -> Algorithm:
    """The configured algorithm, composed from local SGD, stragglers and a server optimiser."""
    local = LocalSGD(
        lr=cfg.client.lr, epochs=cfg.client.epochs, batch_size=cfg.client.batch_size, steps=cfg.client.steps
    )
    s, a = cfg.server, cfg.algorithm
    server_opt: ServerOptimizer
    if s.optimizer == "adam":
        server_opt = ServerAdam(lr=s.lr, beta1=s.beta1, beta2=s.beta2, tau=s.tau)
    elif s.optimizer == "yogi":
        server_opt = ServerYogi(lr=s.lr, beta1=s.beta1, beta2=s.beta2, tau=s.tau)
    elif s.optimizer == "adagrad":
        server_opt = ServerAdagrad(lr=s.lr, beta1=s.beta1, tau=s.tau)
    else:
        server_opt = ServerSGD(lr=s.lr, momentum=s.momentum)
    stragglers = Stragglers(fraction=a.straggler_fraction, drop=a.drop_stragglers)
    aggregator = make_aggregator(cfg.robust.aggregator, **cfg.robust.options)
    if a.name == "fedprox":
        return FedProx(
            local=local,
            mu=a.mu,
            server_optimizer=server_opt,
            stragglers=stragglers,
            aggregator=aggregator,
            weighting=s.weighting,
        )
    if a.name == "scaffold":
        return Scaffold(
            local=local, option=a.scaffold_option, server_optimizer=server_opt, stragglers=stragglers
        )
    if a.name == "fednova":
        return FedNova(local=local, server_optimizer=server_opt, stragglers=stragglers, weighting=s.weighting)
    return FedAvg(
        local=local,
        server_optimizer=server_opt,
        stragglers=stragglers,
        aggregator=aggregator,
        weighting=s.weighting,
    )


def build_pipeline(cfg: ExperimentConfig, privacy: PrivacyPlan | None = None) -> Pipeline:
    """Client-side clipping, then the DP stage, then a simulated attack (malicious clients only).

    The attack runs after the honest stages on the client, so a malicious client
    sends whatever it likes; server-side checks (DP clipping, norm bounds) still apply.
    """
    stages: list[UpdateTransform] = []
    if cfg.transforms.clip_norm > 0:
        stages.append(NormClip(cfg.transforms.clip_norm))
    plan = privacy if privacy is not None else plan_privacy(cfg)
    if plan is not None:
        stages.append(plan.stage)
    at = cfg.attack
    if at.kind in ("sign_flip", "scaling", "gaussian"):
        bad = malicious_clients(cfg.seed, cfg.data.num_clients, at.fraction)
        attack: UpdateTransform
        if at.kind == "sign_flip":
            attack = SignFlip(bad, scale=at.scale)
        elif at.kind == "scaling":
            attack = Scaling(bad, boost=at.boost)
        else:
            attack = GaussianAttack(bad, std=at.std)
        stages.append(attack)
    return Pipeline(tuple(stages))


def _head(ds: ArrayDataset, n: int) -> ArrayDataset:
    return ds if n <= 0 or n >= len(ds) else ds.subset(np.arange(n))


def build_data(cfg: ExperimentConfig) -> tuple[FederatedDataset, ArrayDataset, str]:
    """The federated training data, the central test set, and a description of the source."""
    d: DataConfig = cfg.data
    if d.dataset == "synthetic":
        train = synthetic_fedprox(
            d.synthetic_alpha, d.synthetic_beta, num_clients=d.num_clients, seed=cfg.seed, split="train"
        )
        test_fed = synthetic_fedprox(
            d.synthetic_alpha, d.synthetic_beta, num_clients=d.num_clients, seed=cfg.seed, split="test"
        )
        parts = [test_fed.client_data(c) for c in range(test_fed.num_clients)]
        test = ArrayDataset(
            torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]), parts[0].num_classes
        )
        return train, test, f"synthetic({d.synthetic_alpha}, {d.synthetic_beta})"
    mnist = load_mnist(Path(d.dir) if d.dir else None)
    base = _head(mnist.train, d.train_subset)
    test = _head(mnist.test, d.test_subset)
    kwargs: dict[str, float | int] = {}
    if d.partition == "dirichlet":
        kwargs = {"alpha": d.alpha, "min_size": d.min_client_size}
    elif d.partition == "shards":
        kwargs = {"shards_per_client": d.shards_per_client}
    elif d.partition == "quantity":
        kwargs = {"sigma": d.quantity_sigma, "min_size": d.min_client_size}
    indices = partition(base.y.numpy(), d.partition, d.num_clients, cfg.seed, **kwargs)
    return PartitionedDataset(base, indices), test, mnist.source


def build_components(
    cfg: ExperimentConfig, *, data: tuple[FederatedDataset, ArrayDataset, str] | None = None
) -> Components:
    """Everything a run needs. ``data`` (as returned by :func:`build_data`) skips reloading it,
    e.g. when a benchmark sweeps settings that do not change the data."""
    train, test, source = data if data is not None else build_data(cfg)
    at = cfg.attack
    adversary: ALIE | None = None
    if at.kind == "label_flip":
        train = LabelFlippedDataset(train, malicious_clients(cfg.seed, train.num_clients, at.fraction))
    elif at.kind == "alie":
        adversary = ALIE(malicious_clients(cfg.seed, train.num_clients, at.fraction), z=at.z or None)
    module = build_model(cfg.model.name, cfg.model.kwargs, seed=cfg.seed)
    privacy = plan_privacy(cfg)
    return Components(
        privacy=privacy,
        adversary=adversary,
        algorithm=build_algorithm(cfg),
        pipeline=build_pipeline(cfg, privacy),
        train=train,
        test=test,
        workspace=Workspace(module),
        initial_params=Params.from_module(module),
        data_source=source,
    )
