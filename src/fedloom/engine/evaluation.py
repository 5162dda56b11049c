"""The engine's evaluation stage: the global model on the test data the server holds.

``test_<metric>`` on a central test set; where clients' own test splits are at
hand (simulation), ``site_<metric>`` is the example-weighted mean over every
client's split, ``site_<metric>_{min,p10,median,max}`` its distribution across
clients and ``sites`` each client's values by name; ``fed_<metric>`` (with
``eval.federated``, where the clients' training data is at hand) is the weighted
mean over sampled clients' training data. A driver adds what remote sites
report through :meth:`fedloom.engine.rounds.Driver.site_evaluation`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedloom.algorithms.api import Workspace
from fedloom.config.schema import ExperimentConfig
from fedloom.core.params import Params
from fedloom.core.rng import numpy_rng
from fedloom.data.datasets import ArrayDataset
from fedloom.data.federated import FederatedDataset
from fedloom.metrics import distribution, weighted_mean
from fedloom.sim.evaluate import EvalResult, evaluate

__all__ = ["EvalData", "evaluation_metrics"]


@dataclass(frozen=True)
class EvalData:
    """What the server can evaluate the global model on (each part optional)."""

    workspace: Workspace
    test: ArrayDataset | None = None
    client_test: FederatedDataset | None = None
    client_names: Sequence[str] | None = None
    train: FederatedDataset | None = None  # for ``eval.federated``


def evaluation_metrics(cfg: ExperimentConfig, data: EvalData, params: Params, r: int) -> dict[str, Any]:
    """Round ``r``'s evaluation of ``params`` (see the module docstring for the keys)."""
    ws, bs = data.workspace, cfg.eval.batch_size
    out: dict[str, Any] = {}
    if data.test is not None and len(data.test) > 0:
        ev = evaluate(ws, params, data.test, batch_size=bs)
        out["test_loss"] = ev.loss
        out.update({f"test_{k}": v for k, v in ev.metrics.items()})
    ct = data.client_test
    if ct is not None:
        ids = [c for c in range(ct.num_clients) if ct.client_size(c) > 0]
        results = [evaluate(ws, params, ct.client_data(c), batch_size=bs) for c in ids]
        names = data.client_names or tuple(str(c) for c in range(ct.num_clients))
        out.update(_across_clients("site", results, with_distribution=True))
        out["sites"] = {
            names[c]: {"loss": ev.loss, "num_examples": ev.num_examples, **ev.metrics}
            for c, ev in zip(ids, results, strict=True)
        }
    if cfg.eval.federated and data.train is not None:
        population = data.train.num_clients
        k = min(cfg.eval.federated_clients, population)
        chosen = sorted(
            numpy_rng(cfg.seed, "federated-eval", round=r).choice(population, size=k, replace=False)
        )
        results = [evaluate(ws, params, data.train.client_data(int(c)), batch_size=bs) for c in chosen]
        out.update(_across_clients("fed", results, with_distribution=False))
    return out


def _across_clients(prefix: str, results: list[EvalResult], *, with_distribution: bool) -> dict[str, float]:
    weights = [float(ev.num_examples) for ev in results]
    out = {f"{prefix}_loss": weighted_mean([ev.loss for ev in results], weights)}
    names = sorted({k for ev in results for k in ev.metrics})
    for name in names:
        values = [ev.metrics.get(name, float("nan")) for ev in results]
        out[f"{prefix}_{name}"] = weighted_mean(values, weights)
        if with_distribution:
            out.update({f"{prefix}_{name}_{k}": v for k, v in distribution(values).items()})
    return out
