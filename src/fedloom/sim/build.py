"""Turn a validated experiment config into the run's components."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fedloom.aggregators.registry import make_aggregator
from fedloom.algorithms.aggregate import Weighting
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
from fedloom.core.errors import ConfigError
from fedloom.core.params import Params
from fedloom.data.datasets import ArrayDataset
from fedloom.data.federated import FederatedDataset
from fedloom.sim.privacy_plan import PrivacyPlan, plan_privacy
from fedloom.tasks.builtin import config_task
from fedloom.tasks.loading import load_task
from fedloom.tasks.task import Materialised, PartitionSpec, Task, materialise
from fedloom.transforms.compression.cast import HalfCast
from fedloom.transforms.compression.qsgd import Qsgd
from fedloom.transforms.compression.sparsify import Sparsify
from fedloom.transforms.pipeline import NormClip, Pipeline, UpdateTransform

__all__ = [
    "Components",
    "build_algorithm",
    "build_codec",
    "build_components",
    "build_pipeline",
    "check_fits",
    "materialise_config",
    "split_for",
    "task_for",
]


@dataclass(frozen=True)
class Components:
    algorithm: Algorithm
    pipeline: Pipeline
    train: FederatedDataset
    test: ArrayDataset | None
    workspace: Workspace
    initial_params: Params
    data_source: str
    privacy: PrivacyPlan | None = None
    adversary: ALIE | None = None
    client_test: FederatedDataset | None = None
    client_names: tuple[str, ...] | None = None


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
    weighting: Weighting = "examples" if s.weighting == "auto" else s.weighting
    stragglers = Stragglers(fraction=a.straggler_fraction, drop=a.drop_stragglers)
    aggregator = make_aggregator(cfg.robust.aggregator, **cfg.robust.options)
    if a.name == "fedprox":
        return FedProx(
            local=local,
            mu=a.mu,
            server_optimizer=server_opt,
            stragglers=stragglers,
            aggregator=aggregator,
            weighting=weighting,
        )
    if a.name == "scaffold":
        return Scaffold(
            local=local, option=a.scaffold_option, server_optimizer=server_opt, stragglers=stragglers
        )
    if a.name == "fednova":
        return FedNova(local=local, server_optimizer=server_opt, stragglers=stragglers, weighting=weighting)
    return FedAvg(
        local=local,
        server_optimizer=server_opt,
        stragglers=stragglers,
        aggregator=aggregator,
        weighting=weighting,
    )


def build_pipeline(
    cfg: ExperimentConfig, privacy: PrivacyPlan | None = None, *, population: int | None = None
) -> Pipeline:
    """Client-side clipping, then the DP stage, then a simulated attack (malicious clients only),
    then the codec (``[compression]``).

    ``population`` is the number of clients the malicious ones are drawn from (default
    ``data.num_clients``; a simulation passes its data's own count).

    The attack runs after the honest stages on the client, so a malicious client
    sends whatever it likes; server-side checks (DP clipping, norm bounds) still apply.
    The codec comes last on the client, so its decode is the server's first step:
    central DP clips the decoded update, and under local DP the codec compresses
    the noised update (post-processing); see docs/compression.md.
    """
    stages: list[UpdateTransform] = []
    codec = build_codec(cfg)
    if cfg.transforms.clip_norm > 0:
        stages.append(NormClip(cfg.transforms.clip_norm, server_clip=codec is not None))
    plan = privacy if privacy is not None else plan_privacy(cfg)
    if plan is not None:
        stages.append(plan.stage)
    at = cfg.attack
    if at.kind in ("sign_flip", "scaling", "gaussian"):
        bad = malicious_clients(cfg.seed, population or cfg.data.num_clients, at.fraction)
        attack: UpdateTransform
        if at.kind == "sign_flip":
            attack = SignFlip(bad, scale=at.scale)
        elif at.kind == "scaling":
            attack = Scaling(bad, boost=at.boost)
        else:
            attack = GaussianAttack(bad, std=at.std)
        stages.append(attack)
    if codec is not None:
        stages.append(codec)
    return Pipeline(tuple(stages))


def build_codec(cfg: ExperimentConfig) -> UpdateTransform | None:
    """The configured update codec, the last client stage (after clipping, DP noise and any attack).

    Under secure aggregation ``qsgd`` is not a stage: it is the secure sum's own quantisation into
    the ring (:class:`~fedloom.sim.server_round.SecureSum`), so no codec stage is returned.
    """
    c = cfg.compression
    if c.codec == "none" or cfg.secagg.enabled:
        return None
    if c.codec == "fp16" or c.codec == "bf16":
        return HalfCast(c.codec)
    if c.codec == "qsgd":
        return Qsgd(bits=c.bits, block=c.block)
    kind: Literal["topk", "randk"] = "topk" if c.codec == "topk" else "randk"
    return Sparsify(kind, fraction=c.fraction, error_feedback=c.error_feedback)


_SCHEMES = {"quantity": "quantity_skew"}


def split_for(cfg: ExperimentConfig) -> PartitionSpec:
    """How a central training set is partitioned, from the experiment's ``[data]`` keys."""
    d: DataConfig = cfg.data
    options: dict[str, float | int] = {}
    if d.partition == "dirichlet":
        options = {"alpha": d.alpha, "min_size": d.min_client_size}
    elif d.partition == "shards":
        options = {"shards_per_client": d.shards_per_client}
    elif d.partition == "quantity":
        options = {"sigma": d.quantity_sigma, "min_size": d.min_client_size}
    elif d.partition == "pathological":
        options = {"classes_per_client": d.classes_per_client}
    elif d.partition in ("linear", "square", "exponential"):
        options = {"min_size": d.min_client_size, "rate": d.size_rate}
    elif d.partition == "inner_dirichlet":
        inner: dict[str, str | float | int] = {
            "alpha": d.alpha,
            "size_distribution": d.inner_sizes,
            "min_size": d.min_client_size,
            "sigma": d.quantity_sigma,
            "rate": d.size_rate,
        }
        return PartitionSpec(
            scheme="inner_dirichlet", num_clients=d.num_clients, seed=cfg.seed, options=inner
        )
    return PartitionSpec(
        scheme=_SCHEMES.get(d.partition, d.partition),
        num_clients=d.num_clients,
        seed=cfg.seed,
        options=options,
    )


def task_for(cfg: ExperimentConfig, *, search: Sequence[Path] = ()) -> Task:
    """The experiment's task: ``cfg.task`` by import path, else the built-in one of ``[data]``/``[model]``."""
    if cfg.task:
        return load_task(cfg.task, cfg.task_args, search=search)
    return config_task(cfg, search=search)


def materialise_config(
    cfg: ExperimentConfig, *, task: Task | None = None, search: Sequence[Path] = ()
) -> Materialised:
    """The experiment's task made concrete: workspace, initial parameters and data."""
    t = task if task is not None else task_for(cfg, search=search)
    return materialise(t, seed=cfg.seed, split=split_for(cfg), device=cfg.device or None)


def check_fits(cfg: ExperimentConfig, workspace: Workspace) -> None:
    """Refuse algorithm settings whose update rule assumes plain local SGD when the task's optimiser is not.

    SCAFFOLD's option II estimates the client control variate from the model change
    as ``(x - y_i) / (K lr)``, and FedNova normalises by the step count ``a_i = tau_i``:
    both are the paper's formulas for plain SGD steps.
    """
    opt = workspace.optimizer
    if opt is None or opt.is_plain_sgd():
        return
    a = cfg.algorithm
    problems = []
    if a.name == "scaffold" and a.scaffold_option == "II":
        problems.append(
            f"algorithm.scaffold_option = 'II' derives the control variate from plain-SGD steps, but the "
            f"task's local optimiser is {opt.name} with {dict(opt.kwargs)}; use algorithm.scaffold_option = 'I' "
            "(the gradient at the global model)"
        )
    if a.name == "fednova":
        problems.append(
            f"algorithm.name = 'fednova' normalises by plain-SGD step counts, but the task's local optimiser "
            f"is {opt.name} with {dict(opt.kwargs)}; use plain SGD or another algorithm"
        )
    if problems:
        raise ConfigError(problems)


def build_components(
    cfg: ExperimentConfig,
    *,
    task: Task | None = None,
    materialised: Materialised | None = None,
    search: Sequence[Path] = (),
) -> Components:
    """Everything a run needs. ``task`` replaces the experiment's own; ``materialised`` (from
    :func:`materialise_config`) skips rebuilding the data, e.g. when a benchmark sweeps settings
    that do not change it. ``search`` lists directories to import the task's module from."""
    m = materialised if materialised is not None else materialise_config(cfg, task=task, search=search)
    check_fits(cfg, m.workspace)
    train: FederatedDataset = m.train
    at = cfg.attack
    adversary: ALIE | None = None
    if at.kind == "label_flip":
        train = LabelFlippedDataset(train, malicious_clients(cfg.seed, train.num_clients, at.fraction))
    elif at.kind == "alie":
        adversary = ALIE(malicious_clients(cfg.seed, train.num_clients, at.fraction), z=at.z or None)
    # The data's own client count, not data.num_clients: a task's natural clients are what
    # cohorts are drawn from, so that is the population the accountant must assume.
    privacy = plan_privacy(cfg, population=train.num_clients)
    return Components(
        privacy=privacy,
        adversary=adversary,
        algorithm=build_algorithm(cfg),
        pipeline=build_pipeline(cfg, privacy, population=train.num_clients),
        train=train,
        test=m.test,
        workspace=m.workspace,
        initial_params=m.initial_params,
        data_source=m.source,
        client_test=m.client_test,
        client_names=m.client_names,
    )
