"""The simulation loop: select, broadcast, train, decode, aggregate, update, evaluate, checkpoint.

``run_simulation`` drives any :class:`~fedloom.algorithms.api.Algorithm` through
an executor, recording each round atomically in the run's state database. A
resumed run reloads the last checkpoint and continues; because every random
draw derives from (seed, round, client, purpose), it ends with the same model,
bit for bit, as an uninterrupted run. A resume refuses a configuration that differs
from the one the run was started with (naming the keys; only ``rounds`` may change, to
extend the run, unless it calibrated the DP noise), and a directory whose run
artefacts have no run in the database (see :func:`~fedloom.results.store.orphan_artefacts`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from fedloom.algorithms.api import Aggregate, Broadcast, ClientState, ClientUpdate, ServerContext, ServerState
from fedloom.config.loader import config_differences, config_to_toml
from fedloom.config.schema import ExperimentConfig
from fedloom.core.errors import FedloomError, RunStateError, TrainingError
from fedloom.core.params import Params
from fedloom.core.rng import numpy_rng
from fedloom.core.serde import params_to_bytes
from fedloom.engine.events import (
    EVENTS,
    Aggregated,
    BytesMoved,
    ClientAccepted,
    ClientRejected,
    ClientsSelected,
    EpsilonSpent,
    Evaluated,
    EventBus,
    EventLog,
    Observer,
    RoundCommitted,
    RoundOpened,
    RunStarted,
    RunStopped,
    jsonable,
)
from fedloom.metrics import distribution, weighted_mean
from fedloom.results.store import RunStore, orphan_artefacts
from fedloom.sim.auto import make_executor
from fedloom.sim.build import Components, build_components
from fedloom.sim.evaluate import EvalResult, evaluate
from fedloom.sim.executor import ClientFailure, Executor, Outcome, close_executor
from fedloom.sim.reduce import not_reducible
from fedloom.sim.sampling import draw_cohort
from fedloom.sim.server_round import SecureSum, apply_updates, finish_round
from fedloom.transforms.compression.downlink import compress_broadcast, round_trip
from fedloom.transforms.compression.packed import payload_bytes

__all__ = ["RoundListener", "RunResult", "evaluation_metrics", "run_simulation"]

STATE_DB = "state.sqlite"
METRICS = "metrics.jsonl"
CONFIG = "config.toml"
MODEL = "model.safetensors"


class RoundListener(Protocol):
    """Progress callbacks; the CLI renders them as a progress bar or log lines."""

    def on_start(self, first_round: int, rounds: int, info: Mapping[str, Any]) -> None: ...

    def on_round(self, metrics: Mapping[str, Any]) -> None: ...

    def on_failure(self, failure: ClientFailure, round: int) -> None: ...


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    final_round: int
    final_metrics: Mapping[str, Any]
    stop_reason: str
    state: ServerState


def run_simulation(
    cfg: ExperimentConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    listener: RoundListener | None = None,
    components: Components | None = None,
    executor: Executor | None = None,
    search: Sequence[Path] = (),
    observers: Sequence[Observer] = (),
) -> RunResult:
    """Run (or resume) the experiment ``cfg`` in ``run_dir``; see the module docstring.

    ``components`` replaces what ``cfg`` describes (e.g. a :class:`~fedloom.tasks.Task` given in
    Python, through :func:`~fedloom.sim.build.build_components`); ``search`` lists directories
    to import ``cfg.task``'s module from. Every event of the run (see
    :mod:`fedloom.engine.events`) is appended to ``events.jsonl`` in ``run_dir`` and
    handed to each of ``observers``.
    """
    comps = components if components is not None else build_components(cfg, search=search)
    owned = executor is None  # an executor we build here we also shut down
    execu = executor if executor is not None else make_executor(cfg, comps)
    try:
        return _run(cfg, run_dir, resume, listener, comps, execu, observers)
    finally:
        if owned:
            close_executor(execu)


def _run(
    cfg: ExperimentConfig,
    run_dir: Path,
    resume: bool,
    listener: RoundListener | None,
    comps: Components,
    execu: Executor,
    observers: Sequence[Observer] = (),
) -> RunResult:
    run_dir.mkdir(parents=True, exist_ok=True)
    db_path = run_dir / STATE_DB
    if not resume and db_path.exists():
        raise RunStateError(
            f"{run_dir} already holds a run; resume it with --resume {run_dir} or pick another --out"
        )
    orphans = orphan_artefacts(run_dir, db_path)
    if orphans:
        raise RunStateError(
            f"{run_dir} holds run artefacts ({', '.join(orphans)}) but {db_path} holds no run (missing, "
            "empty, or copied without its -wal file); restore the database, or use another directory"
        )
    with RunStore(db_path, create=not resume) as store:
        if resume:
            stored = store.get_meta("config")
            changed = config_differences(stored, config_to_toml(cfg)) if stored is not None else []
            # A larger round budget extends the run (unless it calibrated the DP noise); any other
            # change would make the resumed rounds those of another experiment.
            extendable = {"rounds"} if cfg.privacy.target_epsilon <= 0 else set()
            if set(changed) - extendable:
                raise RunStateError(
                    f"{run_dir} holds a run with another configuration (differs in {', '.join(changed)}); "
                    "a resumed run keeps its configuration (only `rounds` may change): undo the change "
                    "or start a new run"
                )
            if changed:
                store.set_meta("config", config_to_toml(cfg))
            state = (
                store.load_state()
                if store.latest_round() >= 0
                else comps.algorithm.server_init(comps.initial_params)
            )
            client_states = store.client_states()
            history = store.metrics(up_to=state.round)
        else:
            (run_dir / CONFIG).write_text(config_to_toml(cfg), encoding="utf-8")
            store.set_meta("config", config_to_toml(cfg))
            state = comps.algorithm.server_init(comps.initial_params)
            store.commit_round(state, {"round": 0}, {}, keep=cfg.checkpoint.keep)
            client_states, history = {}, []
        _rewrite_metrics(run_dir / METRICS, [m for m in history if m.get("round", 0) > 0])
        store.set_meta("status", "running")
        log = EventLog(run_dir / EVENTS)
        bus = EventBus()
        bus.subscribe(log)
        for obs in observers:
            bus.subscribe(obs)
        bus.emit(
            RunStarted(
                round=state.round + 1,
                rounds=cfg.rounds,
                runtime="simulation",
                resumed=resume,
                info={"data": comps.data_source},
            )
        )
        if listener is not None:
            listener.on_start(
                state.round + 1, cfg.rounds, {"data": comps.data_source, "run_dir": str(run_dir)}
            )
        last: Mapping[str, Any] = history[-1] if history and history[-1].get("round", 0) > 0 else {}
        try:
            state, last, reason = _loop(
                cfg, comps, execu, store, state, client_states, last, run_dir, listener, bus
            )
        except FedloomError as exc:
            store.set_meta("status", "failed")
            store.set_meta("error", str(exc))
            bus.emit(RunStopped(round=state.round, reason=str(exc), failed=True))
            log.close()
            raise
        bus.emit(RunStopped(round=state.round, reason=reason))
        log.close()
        _write_atomically(run_dir / MODEL, params_to_bytes(state.params))
        store.set_meta("status", "completed")
        store.set_meta("stop_reason", reason)
    return RunResult(
        run_dir=run_dir, final_round=state.round, final_metrics=last, stop_reason=reason, state=state
    )


def _reached(cfg: ExperimentConfig, metrics: Mapping[str, Any]) -> bool:
    target = cfg.eval.target_accuracy
    acc = metrics.get("test_accuracy", metrics.get("site_accuracy"))
    return target > 0 and acc is not None and float(acc) >= target


def _loop(
    cfg: ExperimentConfig,
    comps: Components,
    executor: Executor,
    store: RunStore,
    state: ServerState,
    client_states: dict[int, ClientState],
    last: Mapping[str, Any],
    run_dir: Path,
    listener: RoundListener | None,
    bus: EventBus,
) -> tuple[ServerState, Mapping[str, Any], str]:
    algorithm, pipeline = comps.algorithm, comps.pipeline
    population = comps.train.num_clients
    names = comps.client_names

    def name(cid: int) -> str:
        return names[cid] if names is not None and cid < len(names) else str(cid)

    s = cfg.sampling
    secure = _secure_sum(cfg, comps)
    # An executor that can reduce the round's weighted mean on its workers (Ray) does so when
    # the aggregation is exactly that mean on the raw updates; see fedloom.sim.reduce.
    reduce_on_workers = getattr(executor, "run_round_reduced", None)
    if reduce_on_workers is not None and (
        comps.adversary is not None or secure is not None or not_reducible(algorithm, pipeline) is not None
    ):
        reduce_on_workers = None
    if _reached(cfg, last):
        return state, last, "target accuracy reached"
    with (run_dir / METRICS).open("a", encoding="utf-8") as metrics_file:
        while state.round < cfg.rounds:
            t0 = time.perf_counter()
            r = state.round + 1
            ctx = ServerContext(seed=cfg.seed, round=r, population=population)
            cohort = draw_cohort(
                cfg.seed, r, population, scheme=s.scheme, fraction=s.fraction, min_clients=s.min_clients
            )
            if comps.privacy is not None and comps.privacy.would_exceed(r):
                return state, last, "privacy budget reached"
            bus.emit(RoundOpened(round=r))
            bus.emit(ClientsSelected(round=r, clients=tuple(name(int(c)) for c in cohort)))
            if len(cohort) == 0:  # only under Poisson sampling
                state, last = _empty_round(cfg, comps, state, ctx, t0)
                store.commit_round(state, last, {}, keep=cfg.checkpoint.keep)
                metrics_file.write(json.dumps(last) + "\n")
                metrics_file.flush()
                _emit_round_end(bus, cfg, comps, r, last)
                if listener is not None:
                    listener.on_round(last)
                continue
            reduced: Aggregate | None = None
            # With compression.downlink the clients train from the model as it arrives (widened back).
            broadcast = round_trip(algorithm.broadcast(state), cfg.compression.downlink)
            if reduce_on_workers:
                outcomes, reduced = reduce_on_workers(
                    algorithm, broadcast, cohort.tolist(), client_states, ctx
                )
            else:
                outcomes = executor.run_round(algorithm, broadcast, cohort.tolist(), client_states, ctx)
            wire = _wire_bytes(cfg, algorithm.broadcast(state), outcomes, len(cohort))
            sizes = (
                {o.client_id: payload_bytes(o) for o in outcomes if isinstance(o, ClientUpdate)}
                if wire
                else {}
            )
            if comps.adversary is not None:
                outcomes = comps.adversary.apply(outcomes, ctx)
            for o in outcomes:
                if isinstance(o, ClientFailure) and o.diverged:
                    raise TrainingError(
                        f"{o.reason}; the run stopped at round {r}. The last good checkpoint "
                        f"(round {state.round}) is intact in {store.path}"
                    )
            done = finish_round(algorithm, pipeline, state, outcomes, ctx, secure=secure, precomputed=reduced)
            updates, failures = done.updates, done.failures
            for u in updates:
                bus.emit(
                    ClientAccepted(
                        round=r,
                        client=name(u.client_id),
                        examples=u.num_examples,
                        bytes=sizes.get(u.client_id, 0),
                    )
                )
            for f in failures:
                bus.emit(ClientRejected(round=r, client=name(f.client_id), reason=f.reason))
                if listener is not None:
                    listener.on_failure(f, r)
            if not updates:
                raise TrainingError(f"round {r}: no client update was accepted ({len(failures)} failed)")
            new_state = done.state
            if not new_state.params.all_finite():
                raise TrainingError(
                    f"round {r}: the global model became non-finite (NaN/inf); the last good checkpoint "
                    f"(round {state.round}) is intact in {store.path}"
                )
            state = new_state
            changed = {u.client_id: u.client_state for u in updates if u.client_state is not None}
            client_states.update(changed)
            metrics: dict[str, Any] = {**_round_metrics(r, updates, failures), **wire, **done.metrics}
            if comps.privacy is not None:
                metrics["epsilon"] = comps.privacy.epsilon_after(r)
            if r % cfg.eval.every == 0 or r == cfg.rounds:
                metrics.update(evaluation_metrics(cfg, comps, state.params, r))
            metrics["seconds"] = time.perf_counter() - t0
            store.commit_round(state, metrics, changed, keep=cfg.checkpoint.keep)
            metrics_file.write(json.dumps(metrics) + "\n")
            metrics_file.flush()
            bus.emit(Aggregated(round=r, clients=len(updates), examples=metrics["num_examples"]))
            if wire:
                bus.emit(BytesMoved(round=r, down=wire["bytes_down"], up=wire["bytes_up"]))
            _emit_round_end(bus, cfg, comps, r, metrics)
            last = metrics
            if listener is not None:
                listener.on_round(metrics)
            if _reached(cfg, metrics):
                return state, last, "target accuracy reached"
    return state, last, "round budget reached"


def _emit_round_end(
    bus: EventBus, cfg: ExperimentConfig, comps: Components, r: int, metrics: Mapping[str, Any]
) -> None:
    """The events read off a committed round's metrics row: evaluations, epsilon, the commit."""
    for scope, prefix in (("central", "test_"), ("sites", "site_"), ("federated", "fed_")):
        values = {
            k[len(prefix) :]: jsonable(float(v))
            for k, v in metrics.items()
            if k.startswith(prefix) and isinstance(v, int | float)
        }
        if values:
            bus.emit(Evaluated(round=r, scope=scope, metrics=values))
    sites = metrics.get("sites")
    if isinstance(sites, Mapping):
        for site, values in sites.items():
            if isinstance(values, Mapping):
                bus.emit(
                    Evaluated(
                        round=r,
                        scope="site",
                        site=str(site),
                        metrics={
                            k: jsonable(float(v))
                            for k, v in values.items()
                            if isinstance(v, int | float) and k != "num_examples"
                        },
                        examples=int(values.get("num_examples", 0)),
                    )
                )
    if comps.privacy is not None and "epsilon" in metrics:
        bus.emit(
            EpsilonSpent(
                round=r,
                epsilon=float(metrics["epsilon"]),
                delta=cfg.privacy.delta,
                budget=cfg.privacy.budget_epsilon or cfg.privacy.target_epsilon,
            )
        )
    bus.emit(RoundCommitted(round=r, metrics=jsonable(metrics)))


def _empty_round(
    cfg: ExperimentConfig, comps: Components, state: ServerState, ctx: ServerContext, t0: float
) -> tuple[ServerState, dict[str, Any]]:
    """A round whose (Poisson) cohort is empty.

    Without DP the model is unchanged and only the round number advances. With a
    central DP stage the round still releases its noise (see
    :func:`fedloom.transforms.dp.noised_mean`), and the accountant charges it like
    any other round: the server's output must not depend on whether anyone was drawn.
    """
    metrics: dict[str, Any] = {**_round_metrics(ctx.round, [], []), "train_loss": None}  # nobody trained
    if comps.privacy is not None and comps.privacy.mode != "local":
        empty = Aggregate(delta=state.params.map(torch.zeros_like), num_clients=0, total_weight=0.0)
        new_state, _ = apply_updates(comps.algorithm, comps.pipeline, state, [], ctx, precomputed=empty)
    else:
        new_state = replace(state, round=ctx.round)
    if comps.privacy is not None:
        metrics["epsilon"] = comps.privacy.epsilon_after(ctx.round)
    if ctx.round % cfg.eval.every == 0 or ctx.round == cfg.rounds:
        metrics.update(evaluation_metrics(cfg, comps, new_state.params, ctx.round))
    metrics["seconds"] = time.perf_counter() - t0
    return new_state, metrics


def _wire_bytes(
    cfg: ExperimentConfig, broadcast: Broadcast, outcomes: Sequence[Outcome], cohort: int
) -> dict[str, int]:
    """Tensor bytes the round moves under ``[compression]`` (empty when it is off): ``bytes_up``,
    summed over the clients' (packed) updates, and ``bytes_down``, the broadcast times the cohort."""
    c = cfg.compression
    if c.codec == "none" and c.downlink == "none":
        return {}
    packed, marks = compress_broadcast(broadcast, c.downlink)
    down = packed.params.num_bytes() + marks.num_bytes() + sum(p.num_bytes() for p in packed.extras.values())
    up = sum(payload_bytes(o) for o in outcomes if isinstance(o, ClientUpdate))
    return {"bytes_up": up, "bytes_down": down * cohort}


def _secure_sum(cfg: ExperimentConfig, comps: Components) -> SecureSum | None:
    """Secure-aggregation settings; the public weight bound W is the largest client size."""
    sa = cfg.secagg
    if not sa.enabled:
        return None
    return SecureSum(
        clip=max(1.0, cfg.transforms.clip_norm),
        max_weight=float(comps.train.client_sizes().max()),
        graph=sa.graph,
        degree=sa.degree,
        threshold=sa.threshold,
        bits=sa.bits,
        dropout_after_masking=sa.dropout_after_masking,
        quant_bits=cfg.compression.bits if cfg.compression.codec == "qsgd" else 0,
    )


def _round_metrics(r: int, updates: list[ClientUpdate], failures: list[ClientFailure]) -> dict[str, Any]:
    examples = sum(u.num_examples for u in updates)
    reported = [u for u in updates if "train_loss" in u.metrics]
    loss_examples = sum(u.num_examples for u in reported)
    loss = (
        sum(u.metrics["train_loss"] * u.num_examples for u in reported) / max(loss_examples, 1)
        if reported
        else None
    )
    return {
        "round": r,
        "train_loss": loss,
        "num_clients": len(updates),
        "num_failed": len(failures),
        "num_examples": examples,
    }


def evaluation_metrics(cfg: ExperimentConfig, comps: Components, params: Params, r: int) -> dict[str, Any]:
    """Round ``r``'s evaluation of ``params``: central (``test_*``), per-site (``site_*``), federated (``fed_*``).

    ``test_<metric>`` on the central test set; where clients have their own test
    splits, ``site_<metric>`` is the example-weighted mean over every client's
    split, ``site_<metric>_{min,p10,median,max}`` its distribution across
    clients, and ``sites`` each client's values by name; ``fed_<metric>`` (with
    ``eval.federated``) is the weighted mean over sampled clients' training data.
    """
    ws, bs = comps.workspace, cfg.eval.batch_size
    out: dict[str, Any] = {}
    if comps.test is not None and len(comps.test) > 0:
        ev = evaluate(ws, params, comps.test, batch_size=bs)
        out["test_loss"] = ev.loss
        out.update({f"test_{k}": v for k, v in ev.metrics.items()})
    if comps.client_test is not None:
        ids = [c for c in range(comps.client_test.num_clients) if comps.client_test.client_size(c) > 0]
        results = [evaluate(ws, params, comps.client_test.client_data(c), batch_size=bs) for c in ids]
        names = comps.client_names or tuple(str(c) for c in range(comps.client_test.num_clients))
        out.update(_across_clients("site", results, with_distribution=True))
        out["sites"] = {
            names[c]: {"loss": ev.loss, "num_examples": ev.num_examples, **ev.metrics}
            for c, ev in zip(ids, results, strict=True)
        }
    if cfg.eval.federated:
        population = comps.train.num_clients
        k = min(cfg.eval.federated_clients, population)
        chosen = sorted(
            numpy_rng(cfg.seed, "federated-eval", round=r).choice(population, size=k, replace=False)
        )
        results = [evaluate(ws, params, comps.train.client_data(int(c)), batch_size=bs) for c in chosen]
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


def _rewrite_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    """Make metrics.jsonl agree with the database (a kill may have cut it mid-line)."""
    _write_atomically(path, "".join(json.dumps(m) + "\n" for m in history).encode("utf-8"))


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
