"""The round engine: one loop owns every round of a run, whichever runtime drives it.

A round goes through the same stages in simulation and in deployment:

1. **stop?** the round budget (``rounds``), the privacy budget (the accountant would
   exceed it this round), or the target accuracy (``eval.target_accuracy``, reached by
   the last committed round);
2. **select** the cohort (:meth:`Driver.select`);
3. **broadcast and collect** (:meth:`Driver.collect`: an executor trains the cohort in
   process, or remote clients train and upload under a deadline and a quorum);
4. **validate and aggregate** through the shared server step (:meth:`Driver.aggregate`,
   over :func:`~fedloom.sim.server_round.finish_round` or
   :func:`~fedloom.net.guard.guarded_apply`); an attempt that yields no usable model is
   aborted and the round tried again, up to :attr:`Driver.max_attempts` times;
5. **evaluate** the new model on the test data the server holds
   (:func:`~fedloom.engine.evaluation.evaluation_metrics`) and with what the driver's
   sites report (:meth:`Driver.site_evaluation`);
6. **commit**: the checkpoint in the state database, the ``metrics.jsonl`` row, the
   driver's own bookkeeping (:meth:`Driver.committed`), through a
   :class:`~fedloom.engine.commit.Committer`.

Each stage emits its typed events (:mod:`fedloom.engine.events`), in this order per
round: ``round_opened``, ``clients_selected`` (again for an attempt with another cohort),
per client ``client_accepted`` (by client id), ``client_rejected`` and ``client_dropped``,
``aggregated``, ``evaluated`` (central, sites, each site, federated), ``epsilon_spent``,
``bytes_moved``, ``round_committed``. Per-client events come once the round's collection
is over, so the stream does not depend on the order in which clients answered.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Protocol, TypeVar

import torch

from fedloom.algorithms.api import Aggregate, Algorithm, Broadcast, ClientState, ServerContext, ServerState
from fedloom.config.schema import ExperimentConfig
from fedloom.core.errors import FedloomError, TrainingError
from fedloom.engine.commit import Committer, Sequencer
from fedloom.engine.evaluation import EvalData, evaluation_metrics
from fedloom.engine.events import (
    EVENTS,
    Aggregated,
    BytesMoved,
    ClientAccepted,
    ClientDropped,
    ClientRejected,
    ClientsSelected,
    EpsilonSpent,
    Evaluated,
    Event,
    EventBus,
    EventLog,
    Observer,
    RoundCommitted,
    RoundOpened,
    RunStarted,
    RunStopped,
    jsonable,
)
from fedloom.engine.resume import METRICS, OpenRun, finish_run
from fedloom.sim.privacy_plan import PrivacyPlan
from fedloom.sim.server_round import apply_updates
from fedloom.transforms.pipeline import Pipeline

__all__ = [
    "PRIVACY_BUDGET",
    "ROUND_BUDGET",
    "TARGET_REACHED",
    "Attempt",
    "Contribution",
    "Driver",
    "Finished",
    "RoundEngine",
    "reached_target",
]

ROUND_BUDGET = "round budget reached"
PRIVACY_BUDGET = "privacy budget reached"
TARGET_REACHED = "target accuracy reached"

C = TypeVar("C")


@dataclass(frozen=True)
class Contribution:
    """One accepted client's part in a round: its examples, its reported training loss, its upload."""

    client: int
    examples: int
    train_loss: float | None
    bytes: int = 0  # the update's bytes on the wire (0 in simulation)


@dataclass
class Attempt:
    """A round attempt after the server step.

    ``state`` is the new server state, or ``None`` when the attempt gave no usable model
    (``reason`` says why; the engine tries again). ``contributions`` are sorted by client id.
    """

    state: ServerState | None
    contributions: list[Contribution] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)
    dropped: list[tuple[int, str]] = field(default_factory=list)
    failed: int = 0  # the round's ``num_failed``
    client_states: dict[int, ClientState] = field(default_factory=dict)  # changed ones, to checkpoint
    metrics: dict[str, Any] = field(default_factory=dict)  # the driver's own round metrics
    reason: str = ""
    bytes_down: int = 0
    bytes_up: int = 0
    opened_at: float = 0.0  # perf_counter when the attempt opened (0: when the round began)
    timing: dict[str, float] = field(default_factory=dict)  # the driver's phases, in ms


class Driver(Protocol[C]):
    """What a runtime supplies to the engine; ``C`` is what its collection hands to its aggregation."""

    runtime: str  # "simulation" or "deployment"
    population: int
    max_attempts: int

    def client_name(self, cid: int) -> str: ...

    def select(self, r: int, attempt: int) -> list[int]:
        """Round ``r``'s cohort for this attempt (client ids, ascending)."""
        ...

    def collect(
        self,
        r: int,
        attempt: int,
        state: ServerState,
        broadcast: Broadcast,
        cohort: list[int],
        ctx: ServerContext,
    ) -> C:
        """Send ``broadcast`` to ``cohort`` and collect what comes back."""
        ...

    def aggregate(self, state: ServerState, collected: C, ctx: ServerContext) -> Attempt:
        """Validate what was collected and run the shared server step on it."""
        ...

    def aborted(self, r: int, attempt: int, outcome: Attempt) -> None:
        """An attempt gave no usable model (log and audit it)."""
        ...

    def site_evaluation(self, r: int, state: ServerState, due: bool) -> Mapping[str, Any]:
        """Metrics the sites report about the round's model, merged into the round's row.

        Keys follow :mod:`fedloom.engine.evaluation`: ``site_<metric>`` (the example-weighted
        mean), its distribution and ``sites`` (name -> values with ``num_examples``); they
        become ``evaluated`` events like the server's own. ``due``: an evaluation round
        (``eval.every``, and the last round). Empty where the sites report nothing.
        """
        ...

    def committed(self, state: ServerState, metrics: Mapping[str, Any], timing: dict[str, float]) -> None:
        """Round ``state.round`` is durable (on the committer's thread)."""
        ...


@dataclass(frozen=True)
class Finished:
    """How a run ended: the final state, the last committed round's metrics row, the stop reason."""

    state: ServerState
    last: Mapping[str, Any]
    reason: str


class RoundEngine(Generic[C]):
    """Runs an opened run (:func:`~fedloom.engine.resume.open_run`) to its end through ``driver``.

    Every event goes to ``events.jsonl`` in the run directory and to each of ``observers``.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        run: OpenRun,
        driver: Driver[C],
        *,
        algorithm: Algorithm,
        pipeline: Pipeline,
        privacy: PrivacyPlan | None,
        evaluation: EvalData,
        committer: Committer,
        observers: Sequence[Observer] = (),
        info: Mapping[str, Any] | None = None,
    ) -> None:
        self.cfg, self.run_, self.driver = cfg, run, driver
        self.algorithm, self.pipeline, self.privacy = algorithm, pipeline, privacy
        self.evaluation, self.committer = evaluation, committer
        self.observers, self.info = tuple(observers), dict(info or {})
        self.run_dir = run.store.path.parent
        self.round = run.state.round  # the last round in memory

    def run(self) -> Finished:
        """Run rounds until a stopping rule holds; on an error the run is marked failed and it propagates."""
        run, cfg = self.run_, self.cfg
        from fedloom.trackers import open_trackers  # trackers import their extras only when configured

        trackers = open_trackers(cfg, self.run_dir)
        log = EventLog(self.run_dir / EVENTS)
        bus = EventBus()
        bus.subscribe(log)
        for obs in self.observers:
            bus.subscribe(obs)
        for tracker in trackers:
            bus.subscribe(tracker)
        self.events = Sequencer(bus)
        state = run.state
        try:
            self.events.emit(
                RunStarted(
                    round=state.round + 1,
                    rounds=cfg.rounds,
                    runtime=self.driver.runtime,
                    resumed=run.resumed,
                    info=self.info,
                )
            )
            try:
                done = self._loop()
                self.committer.flush()
                self.committer.wait()
            except FedloomError as exc:
                try:
                    self.committer.flush()
                    self.committer.wait()
                except FedloomError:
                    pass  # the round's own error is the one to report
                self.events.drain()
                run.store.set_meta("status", "failed")
                run.store.set_meta("error", str(exc))
                self.events.emit(RunStopped(round=self.round, reason=str(exc), failed=True))
                raise
            except BaseException:
                # Anything else (a database error, an interrupt): what was held back still goes out,
                # without letting an observer's own error replace this one.
                with contextlib.suppress(Exception):
                    self.events.drain()
                raise
            self.events.emit(RunStopped(round=done.state.round, reason=done.reason))
            finish_run(run, done.state, done.reason)
            return done
        finally:
            log.close()
            for tracker in trackers:
                tracker.close()

    # ---- the loop -------------------------------------------------------------
    def _loop(self) -> Finished:
        cfg = self.cfg
        state, last = self.run_.state, self.run_.last
        if reached_target(cfg, last):
            return Finished(state, last, TARGET_REACHED)
        while state.round < cfg.rounds:
            r = state.round + 1
            if self.privacy is not None and self.privacy.would_exceed(r):
                return Finished(state, last, PRIVACY_BUDGET)
            state, last = self._round(state, r)
            self.round = state.round
            if reached_target(cfg, last):
                return Finished(state, last, TARGET_REACHED)
        return Finished(state, last, ROUND_BUDGET)

    def _round(self, state: ServerState, r: int) -> tuple[ServerState, dict[str, Any]]:
        cfg, driver, emit = self.cfg, self.driver, self.events.emit
        t0 = time.perf_counter()
        ctx = ServerContext(seed=cfg.seed, round=r, population=driver.population)
        broadcast: Broadcast | None = None
        cohort: list[int] | None = None
        for attempt in range(1, driver.max_attempts + 1):
            previous, cohort = cohort, driver.select(r, attempt)
            if attempt == 1:
                emit(RoundOpened(round=r))
            if cohort != previous:
                emit(ClientsSelected(round=r, clients=tuple(driver.client_name(c) for c in cohort)))
            if not cohort:  # only under Poisson sampling
                outcome = self._empty_round(state, ctx)
                break
            if broadcast is None:
                broadcast = self.algorithm.broadcast(state)
            collected = driver.collect(r, attempt, state, broadcast, cohort, ctx)
            t_agg = time.perf_counter()
            outcome = driver.aggregate(state, collected, ctx)
            outcome.timing["aggregate_ms"] = round(1000 * (time.perf_counter() - t_agg), 2)
            if outcome.state is not None:
                break
            self._emit_clients(r, outcome)
            driver.aborted(r, attempt, outcome)
        else:
            raise TrainingError(
                f"round {r} aborted {driver.max_attempts} times (below quorum or no usable model); the last "
                f"good checkpoint (round {state.round}) is intact in {self.run_.store.path}; restart to retry"
            )
        assert outcome.state is not None
        # The round's closing events go out with its commit (see Sequencer), in this order.
        closing: list[Event] = []
        self._emit_clients(r, outcome, closing.append)
        new_state = outcome.state
        metrics: dict[str, Any] = {
            **_round_metrics(r, outcome.contributions, outcome.failed),
            **outcome.metrics,
        }
        if self.privacy is not None:
            metrics["epsilon"] = self.privacy.epsilon_after(r)
        t_eval = time.perf_counter()
        due = r % cfg.eval.every == 0 or r == cfg.rounds
        if due:
            metrics.update(evaluation_metrics(cfg, self.evaluation, new_state.params, r))
        metrics.update(driver.site_evaluation(r, new_state, due))
        outcome.timing["evaluate_ms"] = round(1000 * (time.perf_counter() - t_eval), 2)
        opened = outcome.opened_at or t0
        metrics["seconds"] = time.perf_counter() - opened
        closing.append(
            Aggregated(round=r, clients=len(outcome.contributions), examples=metrics["num_examples"])
        )
        self._emit_evaluations(r, metrics, closing.append)
        if self.privacy is not None:
            closing.append(
                EpsilonSpent(
                    round=r,
                    epsilon=float(metrics["epsilon"]),
                    delta=cfg.privacy.delta,
                    budget=cfg.privacy.budget_epsilon or cfg.privacy.target_epsilon,
                )
            )
        closing.append(BytesMoved(round=r, down=outcome.bytes_down, up=outcome.bytes_up))
        outcome.timing["opened_at_s"] = round(opened, 6)
        outcome.timing["round_wall_ms"] = round(1000 * (time.perf_counter() - opened), 2)
        self._commit(new_state, metrics, outcome.client_states, outcome.timing, closing)
        return new_state, metrics

    def _empty_round(self, state: ServerState, ctx: ServerContext) -> Attempt:
        """A round whose (Poisson) cohort is empty.

        Without DP the model is unchanged and only the round number advances. With a central
        DP stage the round still releases its noise (see :func:`fedloom.transforms.dp.noised_mean`),
        and the accountant charges it like any other round: the server's output must not depend
        on whether anyone was drawn.
        """
        if self.privacy is not None and self.privacy.mode != "local":
            empty = Aggregate(delta=state.params.map(torch.zeros_like), num_clients=0, total_weight=0.0)
            new_state, _ = apply_updates(self.algorithm, self.pipeline, state, [], ctx, precomputed=empty)
        else:
            new_state = replace(state, round=ctx.round)
        return Attempt(state=new_state)

    def _emit_clients(self, r: int, outcome: Attempt, emit: Callable[[Event], None] | None = None) -> None:
        """An attempt's per-client events: accepted (an aborted attempt has none), rejected, dropped."""
        name, emit = self.driver.client_name, emit or self.events.emit
        if outcome.state is not None:
            for u in outcome.contributions:
                emit(ClientAccepted(round=r, client=name(u.client), examples=u.examples, bytes=u.bytes))
        for c, why in outcome.rejected:
            emit(ClientRejected(round=r, client=name(c), reason=why))
        for c, why in outcome.dropped:
            emit(ClientDropped(round=r, client=name(c), reason=why))

    def _emit_evaluations(self, r: int, metrics: Mapping[str, Any], emit: Callable[[Event], None]) -> None:
        """The ``evaluated`` events read off the round's metrics row."""
        for scope, prefix in (("central", "test_"), ("sites", "site_"), ("federated", "fed_")):
            values = {
                k[len(prefix) :]: jsonable(float(v))
                for k, v in metrics.items()
                if k.startswith(prefix) and isinstance(v, int | float)
            }
            if values:
                emit(Evaluated(round=r, scope=scope, metrics=values))
        sites = metrics.get("sites")
        if isinstance(sites, Mapping):
            for site, values in sites.items():
                if isinstance(values, Mapping):
                    emit(
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

    def _commit(
        self,
        state: ServerState,
        metrics: dict[str, Any],
        client_states: dict[int, ClientState],
        timing: dict[str, float],
        closing: Sequence[Event] = (),
    ) -> None:
        """Hand round ``state.round`` to the committer; its ``closing`` events and then its
        ``round_committed`` event follow durability."""
        store, keep, driver, events = self.run_.store, self.cfg.checkpoint.keep, self.driver, self.events
        path = self.run_dir / METRICS

        def job(waited_s: float) -> None:
            timing["commit_wait_ms"] = round(1000 * waited_s, 2)
            start = time.perf_counter()
            store.commit_round(state, metrics, client_states, keep=keep)
            timing["checkpoint_ms"] = round(1000 * (time.perf_counter() - start), 2)
            with path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(metrics) + "\n")
            driver.committed(state, metrics, timing)
            events.release(RoundCommitted(round=state.round, metrics=jsonable(metrics)))

        events.hold(closing)
        self.committer.defer(job)


def reached_target(cfg: ExperimentConfig, metrics: Mapping[str, Any]) -> bool:
    """Whether ``metrics`` (a round's row) reaches ``eval.target_accuracy`` (central, else over sites)."""
    target = cfg.eval.target_accuracy
    acc = metrics.get("test_accuracy", metrics.get("site_accuracy"))
    return target > 0 and acc is not None and float(acc) >= target


def _round_metrics(r: int, contributions: list[Contribution], failed: int) -> dict[str, Any]:
    examples = sum(u.examples for u in contributions)
    reported = [u for u in contributions if u.train_loss is not None]
    loss_examples = sum(u.examples for u in reported)
    loss = (
        sum(float(u.train_loss) * u.examples for u in reported if u.train_loss is not None)
        / max(loss_examples, 1)
        if reported
        else None
    )
    return {
        "round": r,
        "train_loss": loss,
        "num_clients": len(contributions),
        "num_failed": failed,
        "num_examples": examples,
    }
