"""The simulation runtime: a driver of the round engine whose clients train in process.

``run_simulation`` drives any :class:`~fedloom.algorithms.api.Algorithm` through an
executor and the :class:`~fedloom.engine.rounds.RoundEngine`, which records each round
atomically in the run's state database. A resumed run (``resume=True``) reloads the last
checkpoint and continues (see :mod:`fedloom.engine.resume`); only ``rounds`` may change,
to extend the run, unless it calibrated the DP noise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

from fedloom.algorithms.api import Aggregate, Broadcast, ClientState, ClientUpdate, ServerContext, ServerState
from fedloom.config.loader import config_to_toml
from fedloom.config.schema import ExperimentConfig
from fedloom.core.errors import TrainingError
from fedloom.core.params import Params
from fedloom.core.serde import slots_to_bytes
from fedloom.engine.commit import InlineCommitter, ThreadedCommitter
from fedloom.engine.evaluation import EvalData
from fedloom.engine.evaluation import evaluation_metrics as _evaluation_metrics
from fedloom.engine.events import Observer
from fedloom.engine.resume import CONFIG as CONFIG
from fedloom.engine.resume import METRICS as METRICS  # the run directory's files, for importers
from fedloom.engine.resume import MODEL as MODEL
from fedloom.engine.resume import STATE_DB as STATE_DB
from fedloom.engine.resume import open_run
from fedloom.engine.rounds import Attempt, Contribution, RoundEngine
from fedloom.sim.auto import make_executor
from fedloom.sim.build import Components, build_components
from fedloom.sim.executor import ClientFailure, Dispatching, Executor, Outcome, close_executor
from fedloom.sim.reduce import not_reducible
from fedloom.sim.sampling import draw_cohort
from fedloom.sim.server_round import SecureSum, finish_round
from fedloom.trackers import check_tracking_extras
from fedloom.transforms.compression.downlink import broadcast_slots, round_trip
from fedloom.transforms.compression.packed import payload_bytes
from fedloom.transforms.compression.patch import make_patch, patch_blob_size

__all__ = ["RoundListener", "RunResult", "evaluation_metrics", "run_simulation"]


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
    check_tracking_extras(cfg)  # before loading data: a missing extra is a configuration error
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
    # A larger round budget extends the run (unless it calibrated the DP noise); any other
    # change would make the resumed rounds those of another experiment.
    extendable = {"rounds"} if cfg.privacy.target_epsilon <= 0 else set()
    run = open_run(
        cfg,
        run_dir,
        lambda: comps.algorithm.server_init(comps.initial_params),
        resume=resume,
        extendable=extendable,
    )
    # Clients training in other processes leave this one waiting: the previous round's commit
    # (checkpoint, metrics line, events) runs on a thread then, started once the round is out.
    elsewhere = hasattr(execu, "on_dispatch")
    committer = ThreadedCommitter() if elsewhere else InlineCommitter()
    with run.store, committer if isinstance(committer, ThreadedCommitter) else nullcontext():
        if not run.resumed:
            (run_dir / CONFIG).write_text(config_to_toml(cfg), encoding="utf-8")
        driver = SimDriver(cfg, comps, execu, run.client_states, listener, db=run.store.path)
        engine = RoundEngine(
            cfg,
            run,
            driver,
            algorithm=comps.algorithm,
            pipeline=comps.pipeline,
            privacy=comps.privacy,
            evaluation=_eval_data(comps),
            committer=committer,
            observers=observers,
            info={"data": comps.data_source},
        )
        if listener is not None:
            listener.on_start(
                run.state.round + 1, cfg.rounds, {"data": comps.data_source, "run_dir": str(run_dir)}
            )
        if elsewhere:
            cast(Dispatching, execu).on_dispatch = committer.flush
        try:
            done = engine.run()
        finally:
            if elsewhere:
                cast(Dispatching, execu).on_dispatch = None
    return RunResult(
        run_dir=run_dir,
        final_round=done.state.round,
        final_metrics=done.last,
        stop_reason=done.reason,
        state=done.state,
    )


@dataclass
class _Collected:
    outcomes: list[Outcome]
    reduced: Aggregate | None
    wire: dict[str, int]  # bytes_up / bytes_down under [compression] (empty when it is off)
    sizes: dict[int, int]  # each client's (packed) update bytes under [compression]


class SimDriver:
    """The simulation's side of a round: cohorts from (seed, round), clients trained by an executor."""

    runtime = "simulation"
    max_attempts = 1

    def __init__(
        self,
        cfg: ExperimentConfig,
        comps: Components,
        executor: Executor,
        client_states: dict[int, ClientState],
        listener: RoundListener | None,
        *,
        db: Path,
    ) -> None:
        self.cfg, self.comps, self.executor, self.db = cfg, comps, executor, db
        self.client_states, self.listener = client_states, listener
        self.population = comps.train.num_clients
        self.secure = _secure_sum(cfg, comps)
        # An executor that can reduce the round's weighted mean on its workers (Ray) does so when
        # the aggregation is exactly that mean on the raw updates; see fedloom.sim.reduce.
        reduce = getattr(executor, "run_round_reduced", None)
        if reduce is not None and (
            comps.adversary is not None
            or self.secure is not None
            or not_reducible(comps.algorithm, comps.pipeline) is not None
        ):
            reduce = None
        self._reduce = reduce
        # compression.downlink_patch: the last broadcast as it travelled, and who received it
        self._held: tuple[dict[str, Params], frozenset[int]] | None = None

    def client_name(self, cid: int) -> str:
        names = self.comps.client_names
        return names[cid] if names is not None and cid < len(names) else str(cid)

    def select(self, r: int, attempt: int) -> list[int]:
        s = self.cfg.sampling
        cohort = draw_cohort(
            self.cfg.seed, r, self.population, scheme=s.scheme, fraction=s.fraction, min_clients=s.min_clients
        )
        return [int(c) for c in cohort]

    def collect(
        self,
        r: int,
        attempt: int,
        state: ServerState,
        broadcast: Broadcast,
        cohort: list[int],
        ctx: ServerContext,
    ) -> _Collected:
        algorithm = self.comps.algorithm
        reduced: Aggregate | None = None
        # With compression.downlink the clients train from the model as it arrives (widened back).
        received = round_trip(broadcast, self.cfg.compression.downlink)
        if self._reduce is not None:
            outcomes, reduced = self._reduce(algorithm, received, cohort, self.client_states, ctx)
        else:
            outcomes = self.executor.run_round(algorithm, received, cohort, self.client_states, ctx)
        wire, self._held = _wire_bytes(self.cfg, broadcast, outcomes, cohort, self._held)
        sizes = (
            {o.client_id: payload_bytes(o) for o in outcomes if isinstance(o, ClientUpdate)} if wire else {}
        )
        if self.comps.adversary is not None:
            outcomes = self.comps.adversary.apply(outcomes, ctx)
        return _Collected(list(outcomes), reduced, wire, sizes)

    def aggregate(self, state: ServerState, collected: _Collected, ctx: ServerContext) -> Attempt:
        r = ctx.round
        for o in collected.outcomes:
            if isinstance(o, ClientFailure) and o.diverged:
                raise TrainingError(
                    f"{o.reason}; the run stopped at round {r}. The last good checkpoint "
                    f"(round {state.round}) is intact in {self.db}"
                )
        done = finish_round(
            self.comps.algorithm,
            self.comps.pipeline,
            state,
            collected.outcomes,
            ctx,
            secure=self.secure,
            precomputed=collected.reduced,
        )
        updates, failures = done.updates, done.failures
        if self.listener is not None:
            for f in failures:
                self.listener.on_failure(f, r)
        if not updates:
            raise TrainingError(f"round {r}: no client update was accepted ({len(failures)} failed)")
        if not done.state.params.all_finite():
            raise TrainingError(
                f"round {r}: the global model became non-finite (NaN/inf); the last good checkpoint "
                f"(round {state.round}) is intact in {self.db}"
            )
        changed = {u.client_id: u.client_state for u in updates if u.client_state is not None}
        self.client_states.update(changed)
        return Attempt(
            state=done.state,
            contributions=[
                Contribution(
                    u.client_id,
                    u.num_examples,
                    u.metrics.get("train_loss"),
                    collected.sizes.get(u.client_id, 0),
                )
                for u in sorted(updates, key=lambda u: u.client_id)
            ],
            rejected=[(f.client_id, f.reason) for f in failures],
            failed=len(failures),
            client_states=changed,
            metrics={**collected.wire, **done.metrics},
            bytes_down=collected.wire.get("bytes_down", 0),
            bytes_up=collected.wire.get("bytes_up", 0),
        )

    def aborted(self, r: int, attempt: int, outcome: Attempt) -> None:
        pass  # one attempt: a round without a model raises instead

    def site_evaluation(self, r: int, state: ServerState, due: bool) -> Mapping[str, Any]:
        return {}  # the sites' test splits are evaluated by the engine (EvalData.client_test)

    def committed(self, state: ServerState, metrics: Mapping[str, Any], timing: dict[str, float]) -> None:
        if self.listener is not None:
            self.listener.on_round(metrics)


def _eval_data(comps: Components) -> EvalData:
    return EvalData(
        workspace=comps.workspace,
        test=comps.test,
        client_test=comps.client_test,
        client_names=comps.client_names,
        train=comps.train,
    )


def evaluation_metrics(cfg: ExperimentConfig, comps: Components, params: Params, r: int) -> dict[str, Any]:
    """Round ``r``'s evaluation of ``params`` with the components' test data (see
    :func:`fedloom.engine.evaluation.evaluation_metrics`)."""
    return _evaluation_metrics(cfg, _eval_data(comps), params, r)


def _wire_bytes(
    cfg: ExperimentConfig,
    broadcast: Broadcast,
    outcomes: Sequence[Outcome],
    cohort: Sequence[int],
    held: tuple[dict[str, Params], frozenset[int]] | None,
) -> tuple[dict[str, int], tuple[dict[str, Params], frozenset[int]] | None]:
    """Tensor bytes the round moves under ``[compression]`` (empty when it is off): ``bytes_up``,
    summed over the clients' (packed) updates, and ``bytes_down``, the broadcast to each client of
    the cohort; under ``downlink_patch``, as a patch to those who received ``held`` (the last
    broadcast) where that is smaller. Also returns what this round's cohort now holds."""
    c = cfg.compression
    if c.codec == "none" and c.downlink == "none" and not c.downlink_patch:
        return {}, None
    slots = broadcast_slots(broadcast, c.downlink)
    whole = sum(p.num_bytes() for p in slots.values())
    patch = make_patch(slots, held[0]) if c.downlink_patch and held is not None else None
    holders = sum(1 for cid in cohort if held is not None and cid in held[1])
    # the deployment's rule: a patch only where its encoded form is smaller than the broadcast's
    if patch is None or (len(patch) and patch_blob_size(patch) >= len(slots_to_bytes(slots))):
        holders = 0
    down = whole * (len(cohort) - holders) + (patch.num_bytes() * holders if patch is not None else 0)
    up = sum(payload_bytes(o) for o in outcomes if isinstance(o, ClientUpdate))
    now = (slots, frozenset(cohort)) if c.downlink_patch else None
    return {"bytes_up": up, "bytes_down": down}, now


def _secure_sum(cfg: ExperimentConfig, comps: Components) -> SecureSum | None:
    """Secure-aggregation settings; the public weight bound W is the largest client size."""
    sa = cfg.secagg
    if not sa.enabled:
        return None
    return SecureSum(
        clip=max(1.0, cfg.update_norm_bound()),
        max_weight=float(comps.train.client_sizes().max()),
        graph=sa.graph,
        degree=sa.degree,
        threshold=sa.threshold,
        bits=sa.bits,
        dropout_after_masking=sa.dropout_after_masking,
        quant_bits=cfg.compression.bits if cfg.compression.codec == "qsgd" else 0,
    )
