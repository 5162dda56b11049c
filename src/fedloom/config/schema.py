"""The experiment schema: every key, its type, range and documented default.

Sections are frozen pydantic models with ``extra="forbid"``, so an unknown key,
a wrong type or an out-of-range value is rejected with the key's dotted path.
``fedloom config`` prints this schema as a commented TOML file.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "BUILTIN_DATASETS",
    "AlgorithmConfig",
    "AttackConfig",
    "CheckpointConfig",
    "ClientConfig",
    "CompressionConfig",
    "DataConfig",
    "DeployConfig",
    "EvalConfig",
    "ExperimentConfig",
    "ModelConfig",
    "PrivacyConfig",
    "RobustConfig",
    "SamplingConfig",
    "SecAggConfig",
    "ServerConfig",
    "TrackingConfig",
    "TransformsConfig",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


#: The names ``data.dataset`` accepts besides an import path.
BUILTIN_DATASETS = ("mnist", "fashion_mnist", "shakespeare", "heart_disease", "synthetic", "population")


class DataConfig(_Section):
    dataset: str = Field(
        "mnist",
        description="Dataset: 'mnist', 'fashion_mnist' (Zalando's Fashion-MNIST), 'shakespeare' (LEAF's "
        "next-character task, one client per play and speaking role), 'heart_disease' (UCI heart disease, "
        "one client per hospital), 'synthetic' (FedProx Synthetic(alpha, beta)), 'population' "
        "(data.num_clients clients, up to millions, whose data is generated on demand; see the "
        "population_* keys), or an import path 'package.module:factory' to a user's dataset or task: the "
        "factory, called with data.args, returns a fedloom Task, a CentralData or ClientData, an "
        "ArrayDataset (partitioned by data.partition) or a FederatedDataset (one client per id, e.g. a "
        "per-client generator); with a dataset, [model] names the model. 'shakespeare', 'heart_disease', "
        "'synthetic', 'population' and natural per-client data are naturally federated: data.partition "
        "does not apply, and data.num_clients must equal their number of clients (an error names it).",
    )
    args: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments for the factory when data.dataset is an import path.",
    )
    dir: str = Field(
        "",
        description="Directory holding the data files; empty = $FEDLOOM_DATA, the user cache, "
        "the installed data package, then (MNIST, Fashion-MNIST) a checksummed download.",
    )
    num_clients: int = Field(100, ge=1, description="Number of clients the data is split into.")
    partition: Literal[
        "iid",
        "dirichlet",
        "shards",
        "quantity",
        "pathological",
        "inner_dirichlet",
        "linear",
        "square",
        "exponential",
        "natural",
    ] = Field(
        "dirichlet",
        description="How a central training set is split: 'iid'; 'dirichlet' (label skew: each class's "
        "shares over clients ~ Dir(alpha)); 'shards' (McMahan's pathological shards); 'quantity' (IID, "
        "lognormal client sizes, quantity_sigma); 'pathological' (exactly classes_per_client classes per "
        "client); 'inner_dirichlet' (client sizes from inner_sizes, each client's label mix ~ "
        "Dir(alpha * global label distribution)); 'linear' / 'square' / 'exponential' (IID, client k's "
        "size proportional to k+1, (k+1)^2 or exp(size_rate * k)); 'natural' (one client per distinct "
        "value of a custom task's CentralData.groups id column).",
    )
    alpha: float = Field(
        0.5, gt=0, description="Dirichlet concentration for partition = 'dirichlet' or 'inner_dirichlet'."
    )
    shards_per_client: int = Field(2, ge=1, description="Shards per client for partition = 'shards'.")
    classes_per_client: int = Field(
        2, ge=1, description="Classes every client holds for partition = 'pathological'."
    )
    quantity_sigma: float = Field(
        1.0,
        gt=0,
        description="Lognormal sigma of client sizes (partition = 'quantity', inner_sizes = 'lognormal').",
    )
    size_rate: float = Field(
        0.1,
        gt=0,
        description="Rate r of exp(r * k) client sizes (partition = 'exponential', inner_sizes = 'exponential').",
    )
    inner_sizes: Literal["equal", "lognormal", "linear", "square", "exponential"] = Field(
        "equal", description="Client sizes for partition = 'inner_dirichlet' (shapes as for the partitions)."
    )
    min_client_size: int = Field(
        1,
        ge=1,
        description="Smallest allowed client size (dirichlet, quantity, linear, square, exponential, inner_dirichlet).",
    )
    train_subset: int = Field(0, ge=0, description="Use only the first N training examples (0 = all).")
    test_subset: int = Field(
        0,
        ge=0,
        description="Use only the first N test examples (0 = all); for 'shakespeare', the first N of each role.",
    )
    shakespeare_min_samples: int = Field(
        0,
        ge=0,
        description="Shakespeare: drop roles with fewer examples (LEAF's -k; 0 as in LEAF's full-size command).",
    )
    shakespeare_train_fraction: float = Field(
        0.8,
        gt=0,
        lt=1,
        description="Shakespeare: share of each role's examples, in time order, that trains (LEAF's -tf).",
    )
    synthetic_alpha: float = Field(1.0, ge=0, description="Synthetic(alpha, beta): model heterogeneity.")
    synthetic_beta: float = Field(1.0, ge=0, description="Synthetic(alpha, beta): data heterogeneity.")
    population_dim: int = Field(60, ge=1, description="Population: features per example.")
    population_classes: int = Field(10, ge=2, description="Population: number of classes.")
    population_min_size: int = Field(10, ge=1, description="Population: fewest examples a client holds.")
    population_max_size: int = Field(
        100, ge=1, description="Population: most examples a client holds (sizes uniform in between)."
    )
    population_test_clients: int = Field(
        100,
        ge=0,
        description="Population: unseen clients whose pooled data is the central test set (0 = no test set).",
    )

    @model_validator(mode="after")
    def _check_dataset(self) -> DataConfig:
        problems: list[str] = []
        if self.dataset not in BUILTIN_DATASETS:
            module, sep, attr = self.dataset.partition(":")
            if not (sep and module and attr):
                problems.append(
                    f"data.dataset = {self.dataset!r}: expected one of {', '.join(map(repr, BUILTIN_DATASETS))} "
                    "or an import path 'package.module:factory'"
                )
        elif self.args:
            problems.append(
                f"data.args are set but data.dataset = {self.dataset!r} is built in; they are for an import path"
            )
        if self.population_min_size > self.population_max_size:
            problems.append(
                f"data.population_min_size = {self.population_min_size} exceeds data.population_max_size = "
                f"{self.population_max_size}"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


class ModelConfig(_Section):
    name: str = Field(
        "2nn",
        min_length=1,
        description="'2nn', 'cnn', 'logreg', 'stacked_lstm' (LEAF's Shakespeare model), or an import path "
        "'package.module:Class'. With data.dataset = 'shakespeare' the default '2nn' means 'stacked_lstm', "
        "with 'heart_disease' it means logistic regression on the 13 features, with 'population' logistic "
        "regression on its population_dim features.",
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
    weighting: Literal["auto", "examples", "uniform"] = Field(
        "auto",
        description="How client updates are averaged into the pseudo-gradient ('auto' = 'examples' for "
        "fedavg, fedprox and fednova): 'examples' weights each by "
        "its example count (FedAvg's mean, an estimate of the gradient of the example-weighted objective), "
        "'uniform' weights every client equally (Algorithm 2 of arXiv 2003.00295, for FedAdam / FedYogi / "
        "FedAdagrad as published). Example weighting holds for every optimizer, so that changing "
        "server.optimizer changes the optimizer and not the objective; set 'uniform' to reproduce the "
        "paper. Applies to fedavg, fedprox and fednova; scaffold always averages uniformly, and so does "
        "DP (clipped deltas), where 'examples' is refused.",
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
    scheme: Literal["fixed", "poisson"] = Field(
        "fixed",
        description="'fixed': a cohort of max(min_clients, ceil(fraction * clients)) drawn without "
        "replacement; 'poisson': each client joins independently with probability fraction (cohort "
        "sizes vary and may be 0; DP is then accounted for Poisson sampling, with RDP or PLD). "
        "Simulation only.",
    )
    fraction: float = Field(
        0.1, gt=0, le=1, description="Fraction C of clients sampled each round (the rate under 'poisson')."
    )
    min_clients: int = Field(
        1,
        ge=1,
        description="Sample at least this many clients per round ('fixed' only; must be 1 under 'poisson').",
    )


class EvalConfig(_Section):
    every: int = Field(
        1,
        ge=1,
        description="Evaluate every N rounds (and on the last): on the central test set, on each client's "
        "own test split where clients have one (in deployment: each selected site, on its own data).",
    )
    target_accuracy: float = Field(
        0.95, ge=0, le=1, description="Stop once test accuracy reaches this value (0 = run all rounds)."
    )
    batch_size: int = Field(2000, ge=1, description="Batch size for evaluation.")
    federated: bool = Field(False, description="Also evaluate the global model on sampled clients' data.")
    federated_clients: int = Field(10, ge=1, description="Clients sampled for federated evaluation.")


class TransformsConfig(_Section):
    clip_norm: float = Field(0.0, ge=0, description="Clip each client's delta to this L2 norm (0 = off).")


class CompressionConfig(_Section):
    """Compression of updates (uplink) and broadcasts (downlink); see docs/compression.md."""

    codec: Literal["none", "fp16", "bf16", "qsgd", "topk", "randk"] = Field(
        "none",
        description="Update codec: 'fp16'/'bf16' casts, 'qsgd' (stochastic unbiased `bits`-bit "
        "quantisation), 'topk'/'randk' (send `fraction` of the coordinates, with error feedback), "
        "or 'none'. The packed bytes are what a deployed client sends.",
    )
    bits: int = Field(8, description="qsgd: bits per coordinate, 2, 4 or 8.")
    block: int = Field(
        0, ge=0, description="qsgd: coordinates per scale (0 = one scale per parameter tensor)."
    )
    fraction: float = Field(
        0.01, gt=0, le=1, description="topk/randk: fraction of the coordinates sent each round."
    )
    error_feedback: bool = Field(
        True,
        description="topk/randk: keep what was not sent in the client's state and add it next round "
        "(off: dropped; randk then scales by 1/fraction to stay unbiased).",
    )
    downlink: Literal["none", "fp16", "bf16", "q8"] = Field(
        "none",
        description="Broadcast encoding: 'fp16'/'bf16' casts or 'q8' (8 bits per coordinate, one scale "
        "per tensor); clients train from the widened model, the server keeps full precision.",
    )
    downlink_patch: bool = Field(
        False,
        description="A client holding the previous round's broadcast receives only the coordinates that "
        "changed (positions and new values) where that is smaller than the whole broadcast; lossless: "
        "it rebuilds the broadcast bit for bit, checked against its digest.",
    )


class CheckpointConfig(_Section):
    keep: int = Field(
        3,
        ge=0,
        description="Per-round checkpoints kept (0 = all); their tensors are in checkpoints/ beside state.sqlite.",
    )


class DeployConfig(_Section):
    """The gRPC deployment runtime (``fedloom server`` / ``fedloom client``)."""

    clients: list[str] = Field(
        default_factory=list,
        description="Ordered registry of expected client names; a client's id is its index here, and "
        "cohorts are drawn by (seed, round) over this list (empty = '0' .. str(data.num_clients - 1)).",
    )
    deadline_s: float = Field(60.0, gt=0, description="Seconds a round stays open for updates.")
    min_quorum: int = Field(
        1, ge=1, description="Fewest accepted updates that make a round; fewer by the deadline aborts it."
    )
    overselect: float = Field(
        1.0,
        ge=1.0,
        description="Select ceil(overselect * cohort) clients and close the round once the cohort "
        "size of updates arrived; later ones are discarded as late (1.0 = no over-selection).",
    )
    max_round_attempts: int = Field(
        3, ge=1, description="Aborted attempts of one round (below quorum) before the server stops."
    )
    wait_for_clients_s: float = Field(
        300.0, ge=0, description="Seconds to wait for min_quorum clients to be online before a round."
    )
    max_message_bytes: int = Field(
        4 * 1024 * 1024,
        ge=4096,
        description="Largest gRPC message; parameters travel in chunks below this size.",
    )
    max_update_bytes: int = Field(
        0,
        ge=0,
        description="Largest accepted update upload in bytes (0 = 2 x the broadcast size + 64 KiB).",
    )
    max_update_norm: float = Field(
        0.0, ge=0, description="Reject updates whose delta has a larger L2 norm (0 = no bound)."
    )
    weighting: Literal["reported", "uniform"] = Field(
        "reported",
        description="Aggregation weights: 'reported' (the weight each client reports, e.g. its example "
        "count; trusted) or 'uniform' (every accepted update weighs 1, whatever it reports).",
    )
    max_weight: float = Field(
        0.0,
        ge=0,
        description="Reject updates reporting a larger weight (0 = no cap); bounds one client's share of "
        "a weighted mean to max_weight / (max_weight + the others' weights). Under secure aggregation "
        "secagg.max_weight bounds the weights instead.",
    )
    heartbeat_s: float = Field(5.0, gt=0, description="Seconds between client heartbeats.")
    offline_after_s: float = Field(
        20.0, gt=0, description="A client unseen for this many seconds counts as offline."
    )
    select_online: bool = Field(
        False,
        description="Draw each round's cohort among the clients online when it opens (after waiting "
        "for min_quorum of them), so offline or revoked clients do not hold rounds to their deadline; "
        "the cohort is recorded in the state database and reused on resume. Under DP the ledger then "
        "credits no amplification by sampling (who is online is not a uniform sample).",
    )


class PrivacyConfig(_Section):
    """Differential privacy of the released models (client-level; see docs/privacy.md)."""

    mode: Literal["off", "central", "client_clip", "local", "adaptive"] = Field(
        "off",
        description="'central' (server clips and noises the sum; DP-FedAvg), 'client_clip' (clients clip, "
        "server noises), 'local' (each client noises its own update), 'adaptive' (central with a clip norm "
        "tracking a quantile of update norms), or 'off'. Needs the 'privacy' extra.",
    )
    clip_norm: float = Field(1.0, gt=0, description="L2 clip norm C of each client's delta.")
    noise_multiplier: float = Field(
        1.0, ge=0, description="Noise std / clip norm (sigma); ignored when target_epsilon > 0."
    )
    target_epsilon: float = Field(
        0.0, ge=0, description="If > 0, calibrate sigma so that `rounds` rounds spend at most this epsilon."
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="The delta of (epsilon, delta)-DP.")
    accountant: Literal["rdp", "pld"] = Field("rdp", description="Privacy accountant (dp-accounting).")
    budget_epsilon: float = Field(
        0.0, ge=0, description="Stop the run before a round would take epsilon above this (0 = no budget)."
    )
    expected_clients: int = Field(
        0, ge=0, description="Fixed denominator of the noised mean (0 = the round's actual client count)."
    )
    target_quantile: float = Field(0.5, gt=0, lt=1, description="Adaptive clipping: target norm quantile.")
    clip_lr: float = Field(0.2, gt=0, description="Adaptive clipping: geometric step size of the clip norm.")
    count_noise_std: float = Field(
        0.0, ge=0, description="Adaptive clipping: noise std of the clipped count (0 = cohort / 20)."
    )


class RobustConfig(_Section):
    """The aggregation rule (Byzantine-robust alternatives to the weighted mean)."""

    aggregator: Literal[
        "mean", "median", "trimmed_mean", "krum", "multi_krum", "bulyan", "geometric_median", "norm_bound"
    ] = Field("mean", description="Aggregation rule for fedavg/fedprox.")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Options of the rule, e.g. {beta = 0.1} (trimmed_mean), {f = 2} (krum, bulyan), "
        "{f = 2, m = 5} (multi_krum), {bound = 1.0} (norm_bound).",
    )


class AttackConfig(_Section):
    """Simulated malicious clients, to test the defences."""

    kind: Literal["none", "sign_flip", "scaling", "gaussian", "label_flip", "alie"] = Field(
        "none", description="Attack run by the malicious clients."
    )
    fraction: float = Field(0.0, ge=0, lt=1, description="Fraction of the population that is malicious.")
    scale: float = Field(1.0, gt=0, description="sign_flip: the update becomes -scale * update.")
    boost: float = Field(10.0, gt=0, description="scaling: the update is multiplied by boost.")
    std: float = Field(1.0, gt=0, description="gaussian: std of the noise sent instead of the update.")
    z: float = Field(0.0, ge=0, description="alie: shift in standard deviations (0 = the paper's formula).")


class SecAggConfig(_Section):
    """Secure aggregation (Bonawitz et al. 2017; SecAgg+ of Bell et al. 2020): the server sees only the sum."""

    enabled: bool = Field(False, description="Aggregate with secure aggregation (needs the 'secure' extra).")
    graph: Literal["complete", "harary"] = Field(
        "complete", description="'complete' (SecAgg, n^2 cost) or 'harary' (SecAgg+, n log n cost)."
    )
    degree: int = Field(0, ge=0, description="SecAgg+ neighbourhood degree (0 = about 3 log2 n).")
    threshold: int = Field(
        0, ge=0, description="Shamir threshold t per share group (0 = 2/3 of the group + 1)."
    )
    bits: int = Field(32, ge=8, le=53, description="Bits of the fixed-point ring Z_{2^bits}.")
    dropout_after_masking: float = Field(
        0.0, ge=0, lt=1, description="Simulation: fraction of each cohort that drops out after masking."
    )
    max_weight: float = Field(
        0.0,
        ge=0,
        description="Public bound W on a client's weight for secure sums. Deployment: required > 0, "
        "heavier clients are refused; simulation: ignored (W = the largest client size).",
    )


class TrackingConfig(_Section):
    """Experiment trackers fed by the run's events (each needs its extra; a missing one names it)."""

    tensorboard: bool = Field(
        False,
        description="Write TensorBoard event files: every numeric value of each round's metrics row "
        "(per-site values as sites/<site>/<metric>) as a float64 scalar at step = round. Needs the "
        "'tensorboard' extra.",
    )
    tensorboard_dir: str = Field(
        "", description="Directory of the TensorBoard event files; empty = <run dir>/tensorboard."
    )
    mlflow: bool = Field(
        False,
        description="Log the run to MLflow: the configuration as parameters, each round's metrics row "
        "as metrics at step = round. Needs the 'mlflow' extra.",
    )
    mlflow_uri: str = Field(
        "",
        description="MLflow tracking URI; empty = a local file store, file:<run dir>/mlruns (MLflow "
        "keeps its file store behind MLFLOW_ALLOW_FILE_STORE=true, which fedloom sets for a file: URI; "
        "read it with `MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri <that URI>`).",
    )
    mlflow_experiment: str = Field(
        "fedloom", min_length=1, description="MLflow experiment the run is logged under (created if new)."
    )
    run_name: str = Field("", description="Name of the run in MLflow; empty = the run directory's name.")


class ExperimentConfig(_Section):
    """A whole experiment: top-level keys plus one section per component."""

    seed: int = Field(0, ge=0, description="Seed of every random draw in the run.")
    rounds: int = Field(200, ge=1, description="Round budget.")
    executor: Literal["sequential", "parallel", "vectorized", "ray", "auto"] = Field(
        "auto",
        description="Simulation executor: 'sequential' (one client after another, the reference), "
        "'parallel' (worker processes, 1 torch thread each), 'vectorized' (blocks of clients at once "
        "with torch.func), 'ray' (Ray actors; needs the 'ray' extra) or 'auto' (sequential on 1 core "
        "or tiny cohorts, parallel on a multi-core CPU, vectorized on CUDA).",
    )
    workers: int = Field(
        0, ge=0, description="Worker processes / Ray actors for 'parallel' and 'ray' (0 = one per core)."
    )
    vectorized_block: int = Field(
        0,
        ge=0,
        description="Clients trained at once by 'vectorized' (0 = as many as fit a 256 MiB budget, "
        "at most 16 on CPU).",
    )
    out_dir: str = Field("runs", description="Parent directory of new run directories.")
    device: str = Field(
        "",
        description="Device for local training and evaluation ('cpu', 'cuda', 'cuda:1'); empty = the "
        "task's own device (CPU for the built-in tasks).",
    )
    task: str = Field(
        "",
        description="The task: an import path 'package.module:factory' returning a fedloom Task (a module "
        "next to the experiment file is found without PYTHONPATH); empty = the built-in task described "
        "by [data] and [model] (data.dataset).",
    )
    task_args: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments for the task factory named by `task`."
    )
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    client: ClientConfig = Field(default_factory=ClientConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    transforms: TransformsConfig = Field(default_factory=TransformsConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    robust: RobustConfig = Field(default_factory=RobustConfig)
    attack: AttackConfig = Field(default_factory=AttackConfig)
    secagg: SecAggConfig = Field(default_factory=SecAggConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    def update_norm_bound(self) -> float:
        """The L2 norm every client's delta is clipped to before it leaves the client (0 = unbounded).

        ``transforms.clip_norm`` when set, else ``privacy.clip_norm`` under the DP modes
        whose clients clip their own update ('client_clip', 'local'). Secure
        aggregation sizes its fixed-point range from it.
        """
        if self.transforms.clip_norm > 0:
            return self.transforms.clip_norm
        if self.privacy.mode in ("client_clip", "local"):
            return self.privacy.clip_norm
        return 0.0

    @model_validator(mode="after")
    def _cross_checks(self) -> ExperimentConfig:
        problems: list[str] = []
        if self.task and (":" not in self.task or self.task.startswith(":") or self.task.endswith(":")):
            problems.append(f"task = {self.task!r}: expected an import path 'package.module:factory'")
        if self.task_args and not self.task:
            problems.append("task_args are set but no task names a factory to receive them")
        if self.task and ":" in self.data.dataset:
            problems.append(
                f"task = {self.task!r} and data.dataset = {self.data.dataset!r} both name user code; "
                "keep one (a task brings its own data)"
            )
        if self.robust.aggregator != "mean" and self.algorithm.name not in ("fedavg", "fedprox"):
            problems.append(
                f"robust.aggregator = {self.robust.aggregator!r} works with algorithm.name 'fedavg' or "
                f"'fedprox', not {self.algorithm.name!r}"
            )
        if self.server.weighting == "examples":
            # Written out, 'examples' promises example-weighted means, which these never compute.
            if self.algorithm.name == "scaffold":
                problems.append(
                    "server.weighting = 'examples' does not apply to algorithm.name = 'scaffold' (its "
                    "control variates need the uniform mean); leave server.weighting = 'auto'"
                )
            if self.privacy.mode != "off":
                problems.append(
                    f"server.weighting = 'examples' does not apply with privacy.mode = {self.privacy.mode!r} "
                    "(DP averages clipped deltas uniformly: a client's weight would raise its sensitivity); "
                    "leave server.weighting = 'auto'"
                )
        if self.privacy.mode != "off":
            if self.robust.aggregator != "mean":
                problems.append(
                    f"privacy.mode = {self.privacy.mode!r} needs robust.aggregator = 'mean' (the DP "
                    f"sensitivity bound assumes the mean), got {self.robust.aggregator!r}"
                )
            if self.algorithm.name not in ("fedavg", "fedprox"):
                problems.append(
                    f"privacy.mode = {self.privacy.mode!r} works with algorithm.name 'fedavg' or 'fedprox', "
                    f"not {self.algorithm.name!r}"
                )
            if self.transforms.clip_norm > 0:
                problems.append(
                    "privacy.mode clips by itself: set transforms.clip_norm = 0 and use privacy.clip_norm"
                )
        if (
            self.privacy.accountant == "pld"
            and self.privacy.mode in ("central", "client_clip", "adaptive")
            and self.sampling.scheme != "poisson"
        ):
            problems.append(
                "privacy.accountant = 'pld' needs sampling.scheme = 'poisson' (dp-accounting's PLD has no "
                "fixed-size sampling event); set it, or use accountant = 'rdp'"
            )
        if self.sampling.scheme == "poisson" and self.sampling.min_clients != 1:
            problems.append(
                f"sampling.min_clients = {self.sampling.min_clients} does not apply to sampling.scheme = "
                "'poisson' (a floor on the cohort would change the sampling the accountant assumes); leave it at 1"
            )
        if self.secagg.enabled:
            if self.update_norm_bound() <= 0:
                problems.append(
                    "secagg.enabled needs bounded updates for its fixed-point encoding: set "
                    "transforms.clip_norm > 0, or privacy.mode = 'client_clip' or 'local' (clients clip "
                    "to privacy.clip_norm)"
                )
            if self.robust.aggregator != "mean" or self.algorithm.name not in ("fedavg", "fedprox"):
                problems.append(
                    "secagg.enabled supports the weighted mean of fedavg/fedprox only (the server sees no "
                    "individual update, so robust rules and SCAFFOLD/FedNova extras cannot run)"
                )
            if self.privacy.mode in ("central", "adaptive"):
                problems.append(
                    f"secagg.enabled with privacy.mode = {self.privacy.mode!r}: central DP clips each update on "
                    "the server, which secure aggregation hides; use 'client_clip' or 'local'"
                )
        problems += self._compression_checks()
        if self.attack.kind != "none" and self.attack.fraction == 0:
            problems.append(f"attack.kind = {self.attack.kind!r} needs attack.fraction > 0")
        if problems:
            raise ValueError("\n  - ".join(problems))
        if self.sampling.min_clients > self.data.num_clients:
            raise ValueError(
                f"sampling.min_clients = {self.sampling.min_clients} exceeds data.num_clients = "
                f"{self.data.num_clients}"
            )
        return self

    def _compression_checks(self) -> list[str]:
        """Refuse compression settings that would break DP's or secure aggregation's guarantee."""
        c, problems = self.compression, []
        if c.bits not in (2, 4, 8):
            problems.append(f"compression.bits = {c.bits}: expected 2, 4 or 8")
        if c.codec == "none":
            return problems
        if self.attack.kind == "alie":
            problems.append(
                f"attack.kind = 'alie' with compression.codec = {c.codec!r}: the ALIE adversary crafts its "
                "update from the round's benign deltas in the clear, which a codec has packed"
            )
        if self.privacy.mode == "client_clip":
            problems.append(
                f"compression.codec = {c.codec!r} with privacy.mode = 'client_clip': the codec runs after the "
                "client's clip and can raise the norm above privacy.clip_norm (stochastic rounding, the "
                "error-feedback residual, a cast's rounding), so the server's sensitivity check would refuse "
                "honest clients or the noise would no longer cover the sensitivity; use privacy.mode = "
                "'central' (the server clips after decoding) or 'local' (compressing a noised update is "
                "post-processing)"
            )
        if self.secagg.enabled:
            if c.codec != "qsgd":
                problems.append(
                    f"compression.codec = {c.codec!r} with secagg.enabled: the masks are dense and uniform over "
                    "the ring, so a cast or a sparse update saves nothing on the wire (and a top-k index list "
                    "would show the server which coordinates each client changed); use codec = 'qsgd', "
                    "which quantises into the ring"
                )
            elif c.block != 0:
                problems.append(
                    "compression.block must be 0 with secagg.enabled: under secure aggregation every client "
                    "quantises on the same public scale (transforms.clip_norm), or the sum could not be decoded"
                )
        return problems
