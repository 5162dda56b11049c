"""Evaluation rounds of the deployed server: each selected site evaluates the global model on its own data.

After round ``r`` aggregates, and when ``r`` is an evaluation round (every ``eval.every``
rounds and the last, as in the simulation), :func:`evaluate_sites` opens an
*evaluation phase* on a :class:`SiteEvaluation` desk: each site selected for round ``r``
(except the round's dropouts, which did not answer it) gets an ``EVALUATE`` task naming the new global model (``TaskReply.broadcast_digest``),
downloads it (``Download``), runs the task's loss and metrics on its LOCAL test split and
answers with the ``Evaluate`` RPC (an ``EvalReport``: loss, metrics, number of
examples; or ``unavailable`` with the reason, e.g. a site without a test split). The
phase closes once every asked site has answered, or at ``deploy.deadline_s``.

A report is untrusted input. :func:`check_report` refuses, naming the client, the round
and the field: a report for another round or model, from a site not asked, a second
report, a non-finite loss or metric value, a metric name that is not one of the task's,
a task metric missing, or an example count outside ``[1, MAX_EXAMPLES]``. A refused
report is that site's answer for the round (it is left out of the metrics, with an
audit row ``eval_refused``); nothing else is touched.

The accepted reports become round ``r``'s metrics with the simulation's keys (see
:func:`fedloom.sim.runner.evaluation_metrics`): ``site_loss`` and ``site_<metric>``
(example-weighted means over the sites), ``site_<metric>_{min,p10,median,max}``
(the distribution across sites) and ``sites`` (each site's loss, metrics and
``num_examples`` by name; an undefined metric is NaN). They land in the round's
metrics row (``metrics.jsonl`` and the state database) and as
:class:`~fedloom.engine.events.Evaluated` events (scope ``"site"`` per site,
``"sites"`` for the aggregate).

A site that answered ``unavailable`` is not asked again until it joins anew (it has no
test data; asking costs every later evaluation round a round trip per site).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedloom.algorithms.api import Broadcast
from fedloom.config.schema import ExperimentConfig
from fedloom.core.errors import UpdateError
from fedloom.core.params import Params
from fedloom.metrics import distribution, weighted_mean
from fedloom.net.coordinator import Task
from fedloom.net.logs import JsonLog
from fedloom.net.proto import fedloom_pb2 as pb
from fedloom.net.state import NetState
from fedloom.net.wire import encode_broadcast, fingerprint, model_digest
from fedloom.sim.evaluate import EvalResult

__all__ = [
    "MAX_EXAMPLES",
    "EvaluationReportError",
    "SiteEvaluation",
    "check_report",
    "evaluate_sites",
    "evaluation_due",
    "site_metrics",
]

#: The largest test split a site may report (a count above it is refused as not sane).
MAX_EXAMPLES = 1_000_000_000
#: Metric names, and the ``unavailable`` reason, are cut to this many characters in messages.
_MAX_NAME = 100


class EvaluationReportError(UpdateError):
    """A site's evaluation report was refused; the message names the client, the round and the field."""


def _short(text: str, limit: int = _MAX_NAME) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def evaluation_due(cfg: ExperimentConfig, r: int) -> bool:
    """Whether round ``r`` is an evaluation round: every ``eval.every`` rounds, and the last."""
    return r % cfg.eval.every == 0 or r == cfg.rounds


def check_report(
    report: pb.EvalReport, *, client: str, round: int, digest: str, known: Sequence[str]
) -> EvalResult | None:
    """The evaluation that ``report`` carries (``None``: the site has none), or raise
    :class:`EvaluationReportError` naming ``client``, the round and the offending field.

    ``round`` and ``digest`` name the evaluation the site was asked for; ``known`` are the
    task's metric names (the report must give each of them, as a finite value or as undefined).
    """
    where = f"evaluation report from client {client!r} for round {report.round}"
    if report.round != round:
        raise EvaluationReportError(
            f"{where}: field 'round' = {report.round}, but round {round} is evaluated"
        )
    if report.model_digest != digest:
        raise EvaluationReportError(
            f"{where}: field 'model_digest' names another model ({_short(report.model_digest, 12)}), "
            f"not round {round}'s"
        )
    if report.unavailable:
        if report.num_examples != 0 or report.metrics or report.undefined:
            raise EvaluationReportError(
                f"{where}: field 'unavailable' is set, but the report also carries results"
            )
        return None
    n = report.num_examples
    if not 1 <= n <= MAX_EXAMPLES:
        raise EvaluationReportError(f"{where}: field 'num_examples' = {n} is outside [1, {MAX_EXAMPLES}]")
    if not math.isfinite(report.loss):
        raise EvaluationReportError(f"{where}: field 'loss' = {report.loss!r} is not finite")
    names = set(known)
    values: dict[str, float] = {}
    for name, value in sorted(report.metrics.items()):
        if name not in names:
            raise EvaluationReportError(
                f"{where}: field 'metrics' names {_short(name)!r}, not one of the task's metrics "
                f"({', '.join(sorted(names)) or 'none'})"
            )
        if not math.isfinite(value):
            raise EvaluationReportError(
                f"{where}: field 'metrics' has {name!r} = {value!r}, not finite "
                "(an undefined metric goes in 'undefined')"
            )
        values[name] = float(value)
    for name in report.undefined:
        if name not in names:
            raise EvaluationReportError(
                f"{where}: field 'undefined' names {_short(name)!r}, not one of the task's metrics"
            )
        if name in values:
            raise EvaluationReportError(f"{where}: metric {name!r} is both in 'metrics' and in 'undefined'")
        values[name] = float("nan")
    missing = sorted(names - set(values))
    if missing:
        raise EvaluationReportError(
            f"{where}: field 'metrics' lacks the task's metric(s) {', '.join(missing)}"
        )
    return EvalResult(loss=float(report.loss), num_examples=int(n), metrics=values)


def site_metrics(results: Mapping[str, EvalResult]) -> dict[str, Any]:
    """The simulation's per-site keys from each site's evaluation (by name; empty: no site reported).

    ``site_loss`` and ``site_<metric>`` are example-weighted means over the sites' finite values,
    ``site_<metric>_{min,p10,median,max}`` the distribution across sites, ``sites`` each site's
    ``loss``, ``num_examples`` and metrics.
    """
    if not results:
        return {}
    names = list(results)  # in the caller's order (client ids), as the simulation's sums run
    evs = [results[s] for s in names]
    weights = [float(ev.num_examples) for ev in evs]
    out: dict[str, Any] = {"site_loss": weighted_mean([ev.loss for ev in evs], weights)}
    for metric in sorted({k for ev in evs for k in ev.metrics}):
        values = [ev.metrics.get(metric, float("nan")) for ev in evs]
        out[f"site_{metric}"] = weighted_mean(values, weights)
        out.update({f"site_{metric}_{k}": v for k, v in distribution(values).items()})
    out["sites"] = {
        s: {"loss": ev.loss, "num_examples": ev.num_examples, **ev.metrics}
        for s, ev in zip(names, evs, strict=True)
    }
    return out


@dataclass
class _Phase:
    round: int
    blob: bytes
    digest: str
    xxh3: int
    asked: frozenset[int]
    deadline: float
    results: dict[int, EvalResult] = field(default_factory=dict)
    answered: set[int] = field(default_factory=set)


class SiteEvaluation:
    """The evaluation desk shared by the round loop and the RPC handlers (thread-safe).

    The round loop opens a phase (:meth:`open`) and waits for it (:meth:`wait`); GetTask asks
    :meth:`task_now`, Download :meth:`blob`, the Evaluate RPC :meth:`receive`.
    """

    def __init__(self, names: Sequence[str], known: Sequence[str], state: NetState, log: JsonLog) -> None:
        self.names = list(names)
        self.known = tuple(known)
        self._state = state
        self._log = log
        self._cond = threading.Condition()
        self._phase: _Phase | None = None
        self._no_data: set[int] = set()
        self._watchers: list[Callable[[], None]] = []

    def watch_tasks(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (it must not block) whenever a phase opens: sites may have a task."""
        with self._cond:
            self._watchers.append(callback)

    def forget(self, cid: int) -> None:
        """``cid`` joined (anew): ask it again even if it had no test data before."""
        with self._cond:
            self._no_data.discard(cid)

    def open(self, round: int, params: Params, sites: Sequence[int], deadline_s: float) -> list[int]:
        """Open round ``round``'s evaluation of ``params`` for ``sites``; returns the sites asked
        (those not known to lack test data)."""
        with self._cond:
            asked = frozenset(c for c in sites if c not in self._no_data)
        if not asked:  # nobody to ask: no model to encode either
            return []
        blob = encode_broadcast(Broadcast(round=round, params=params))
        with self._cond:
            self._phase = _Phase(
                round=round,
                blob=blob,
                digest=model_digest(blob),
                xxh3=fingerprint(blob),
                asked=asked,
                deadline=time.monotonic() + deadline_s,
            )
            for callback in self._watchers:
                callback()
        return sorted(asked)

    def task_now(self, cid: int) -> Task | None:
        """``cid``'s EVALUATE task while a phase asks it and it has not answered, else ``None``."""
        with self._cond:
            p = self._phase
            if p is None or cid not in p.asked or cid in p.answered:
                return None
            return Task(
                "evaluate",
                round=p.round,
                digest=p.digest,
                size=len(p.blob),
                xxh3=p.xxh3,
                deadline_in_s=max(0.0, math.floor(10 * (p.deadline - time.monotonic())) / 10),
            )

    def blob(self, round: int, digest: str) -> bytes | None:
        """The open phase's model blob, if it is round ``round``'s and named ``digest``."""
        with self._cond:
            p = self._phase
            if p is None or p.round != round or p.digest != digest:
                return None
            return p.blob

    def receive(self, cid: int, report: pb.EvalReport) -> str | None:
        """Take ``cid``'s report; returns why it was refused, or ``None`` if it counts."""
        name = self.names[cid]
        with self._cond:
            p = self._phase
            if p is None or p.round != report.round or cid not in p.asked:
                why = (
                    f"evaluation report from client {name!r} for round {report.round}: no evaluation of "
                    "that round is open for this client"
                )
                return self._refuse(cid, report.round, why)
            if cid in p.answered:
                why = (
                    f"evaluation report from client {name!r} for round {report.round}: it already "
                    "answered (one report per site and round)"
                )
                return self._refuse(cid, report.round, why)
            try:
                result = check_report(report, client=name, round=p.round, digest=p.digest, known=self.known)
            except EvaluationReportError as exc:
                # Refused: still this site's answer, so the phase need not wait for the deadline.
                p.answered.add(cid)
                self._cond.notify_all()
                why = str(exc)
            else:
                p.answered.add(cid)
                if result is None:
                    self._no_data.add(cid)
                else:
                    p.results[cid] = result
                self._cond.notify_all()
                why = ""
        if why:
            return self._refuse(cid, report.round, why)
        if result is None:
            reason = _short(report.unavailable, 300)
            self._state.audit(report.round, cid, name, "eval_unavailable", 0, reason)
            self._log("evaluation_unavailable", client=name, round=report.round, reason=reason)
        else:
            detail = json.dumps({"num_examples": result.num_examples, "loss": result.loss, **result.metrics})
            self._state.audit(report.round, cid, name, "evaluated", 0, detail)
        return None

    def _refuse(self, cid: int, round: int, why: str) -> str:
        self._state.audit(round, cid, self.names[cid], "eval_refused", 0, why)
        self._log("evaluation_refused", level="warning", client=self.names[cid], round=round, reason=why)
        return why

    def wait(self) -> tuple[dict[int, EvalResult], list[int]]:
        """Block until every asked site answered or the deadline passed; close the phase.

        Returns the accepted evaluations by client id and the asked sites that never answered.
        """
        with self._cond:
            p = self._phase
            if p is None:
                return {}, []
            while not p.asked <= p.answered:
                left = p.deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(timeout=left)
            self._phase = None
            return dict(p.results), sorted(p.asked - p.answered)


def evaluate_sites(
    desk: SiteEvaluation,
    cfg: ExperimentConfig,
    r: int,
    params: Params,
    sites: Sequence[int],
    log: JsonLog,
) -> dict[str, Any]:
    """Round ``r``'s evaluation of ``params`` on the test splits of ``sites`` (the round's selected
    clients), when ``r`` is an evaluation round: the per-site metrics (see :func:`site_metrics`;
    empty when no site reported), which the round engine records and emits as
    :class:`~fedloom.engine.events.Evaluated` events. Blocks until every asked site answered, or
    ``deploy.deadline_s``."""
    if not evaluation_due(cfg, r):
        return {}
    if not desk.open(r, params, sites, cfg.deploy.deadline_s):
        return {}
    results, silent = desk.wait()
    if silent:
        log("evaluation_missing", level="warning", round=r, clients=[desk.names[c] for c in silent])
    return site_metrics({desk.names[c]: results[c] for c in sorted(results)})
