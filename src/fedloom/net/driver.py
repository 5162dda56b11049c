"""The deployment's side of a round, as a driver of the round engine (:mod:`fedloom.engine.rounds`).

Cohorts come from ``sample_clients(seed, round, population, size)`` over the ordered
registry ``deploy.clients`` (under DP from :func:`~fedloom.sim.sampling.secret_sample`
with a secret the server generates at run start, keeps in its state database and never
sends, so that no client can predict a cohort); a round resumed after a restart keeps
its recorded cohort. An attempt waits for ``deploy.min_quorum`` clients online, opens
the round in the :class:`~fedloom.net.coordinator.Coordinator` (which validates and
decodes each upload as it arrives, and restores the updates a killed server had
accepted) and waits for it to close (the cohort answered, or the deadline). The server
step runs through :func:`fedloom.net.guard.guarded_apply`: an update that makes the new
model unusable, or makes the step raise, is left out and rejected; an attempt below
quorum, or with no usable model, is aborted and the round tried again
(``deploy.max_round_attempts``).

Secure aggregation (``secagg.enabled``): an attempt runs through a
:class:`~fedloom.net.secure.SecureRelay` -- clients upload no update, the server relays
the four SecAgg stages and turns the unmasked sum into the aggregate.

A committed round releases its pending updates, is audited, and is logged as
``round_committed`` with ``phases``: where the round's wall time went (see
:mod:`fedloom.net.timing`), so the overhead benchmark can be explained.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedloom.algorithms.api import Algorithm, Broadcast, ServerContext, ServerState
from fedloom.config.schema import ExperimentConfig
from fedloom.core.errors import TrainingError
from fedloom.core.rng import numpy_rng
from fedloom.engine.commit import ThreadedCommitter
from fedloom.engine.rounds import Attempt, Contribution
from fedloom.net.coordinator import Closed, Coordinator
from fedloom.net.evaluation import SiteEvaluation, evaluate_sites
from fedloom.net.guard import Guarded, guarded_apply
from fedloom.net.logs import JsonLog
from fedloom.net.state import NetState
from fedloom.net.wire import encode_broadcast, encode_patch, model_digest
from fedloom.sim.privacy_plan import PrivacyPlan
from fedloom.sim.sampling import sample_clients, secret_sample
from fedloom.transforms.pipeline import Pipeline

if TYPE_CHECKING:  # fedloom.net.secure needs the optional 'secure' extra
    from fedloom.net.secure import SecureRelay

__all__ = ["DeploymentDriver", "draw_cohort"]


@dataclass
class _Collected:
    closed: Closed
    contributors: int
    secure_error: str
    encode_ms: float
    opened_at: float
    cpu_at_open: float
    broadcast: Broadcast


class DeploymentDriver:
    """Rounds run by remote clients through the :class:`Coordinator` (see the module docstring)."""

    runtime = "deployment"

    def __init__(
        self,
        cfg: ExperimentConfig,
        coord: Coordinator,
        net: NetState,
        algorithm: Algorithm,
        pipeline: Pipeline,
        privacy: PrivacyPlan | None,
        log: JsonLog,
        committer: ThreadedCommitter,
        *,
        evals: SiteEvaluation | None = None,
        selected_n: int,
        size: int,
        secret: bytes,
    ) -> None:
        self.cfg, self.coord, self.net, self.log, self.committer = cfg, coord, net, log, committer
        self.evals = evals
        self.algorithm, self.pipeline, self.privacy = algorithm, pipeline, privacy
        self.selected_n, self.size, self.secret = selected_n, size, secret
        self.population = len(coord.names)
        self.max_attempts = cfg.deploy.max_round_attempts
        self._cohort: list[int] | None = None
        self._blob: tuple[int, bytes, str, float] = (0, b"", "", 0.0)  # round, blob, digest, encode ms
        # compression.downlink_patch: (the last round's digest, this round's blob as a patch against it)
        self._patch: tuple[str, bytes | None] | None = None
        self._cpu_mark: float | None = None
        self._clients: dict[int, list[int]] = {}
        self._attempt = 0
        self._closed: Closed | None = None

    def client_name(self, cid: int) -> str:
        return self.coord.names[cid]

    def select(self, r: int, attempt: int) -> list[int]:
        d = self.cfg.deploy
        _wait_for_clients(self.coord, d.min_quorum, d.wait_for_clients_s, r, self.log, self.committer)
        if attempt == 1:
            self._cohort = self.net.cohort(r)  # a round resumed after a restart keeps its selection
        if self._cohort is None or (attempt > 1 and d.select_online):  # an aborted attempt: draw again
            online = self.coord.online() if d.select_online else None
            secret = self.secret if self.privacy is not None else b""
            self._cohort = draw_cohort(self.cfg, r, self.population, self.selected_n, online, secret)
            self.net.record_cohort(r, self._cohort)
        return list(self._cohort)

    def collect(
        self,
        r: int,
        attempt: int,
        state: ServerState,
        broadcast: Broadcast,
        cohort: list[int],
        ctx: ServerContext,
    ) -> _Collected:
        if self._blob[0] != r:
            t_encode = time.perf_counter()
            held = self._blob
            blob = encode_broadcast(broadcast, self.cfg.compression.downlink)
            digest = model_digest(blob)
            # compression.downlink_patch: the clients that hold the last round's broadcast may get
            # this one as a patch against it (lost with a restart: the first round after sends it whole)
            self._patch = None
            if self.cfg.compression.downlink_patch:
                self._patch = (held[2], encode_patch(blob, held[1]) if held[1] else None)
            self._blob = (r, blob, digest, 1000 * (time.perf_counter() - t_encode))
        _, blob, digest, encode_ms = self._blob
        self._attempt = attempt
        coord, net = self.coord, self.net
        lost = net.lost_pending(r)
        if lost:  # only after an OS crash or power loss (see fedloom.net.state)
            # Their rows go, so that the clients, still selected, are asked again and re-upload.
            net.drop_lost_pending(r, lost)
            self.log("pending_lost", level="warning", round=r, clients=[coord.names[c] for c in lost])
        t0, cpu0 = time.perf_counter(), time.process_time()
        target = min(self.size, len(cohort))
        relay = _secure_relay(self.cfg, cohort, target, broadcast, r)
        coord.open_round(
            broadcast,
            blob,
            digest,
            attempt=attempt,
            selected=cohort,
            target=target,
            deadline_s=self.cfg.deploy.deadline_s,
            ctx=ctx,
            pending=net.pending(r) if relay is None else (),
            algo_state=state.algo_state,
            relay=relay,
            patch=self._patch,
        )
        self.committer.flush()  # the previous round's commit, now that this round is open
        secure_error = ""
        if relay is None:
            closed = coord.wait_close()
            contributors = len(closed.updates)
        else:
            from fedloom.secagg.errors import SecAggError

            try:
                outcome = relay.run()
            except SecAggError as exc:
                outcome, secure_error = None, f"; {exc}"
            closed = coord.close_secure(outcome)
            contributors = len(outcome.included) if outcome is not None else 0
        return _Collected(closed, contributors, secure_error, encode_ms, t0, cpu0, broadcast)

    def aggregate(self, state: ServerState, collected: _Collected, ctx: ServerContext) -> Attempt:
        d, r, closed = self.cfg.deploy, ctx.round, collected.closed
        contributors, unusable = collected.contributors, ""
        rejected = list(closed.rejected)
        new_state: ServerState | None = None
        if contributors >= d.min_quorum:
            guarded, closed = _aggregate(
                self.cfg, self.algorithm, self.pipeline, state, closed, collected.broadcast, ctx
            )
            for c, why in sorted(guarded.blamed.items()):  # left out: not restored by the next attempt
                self.net.drop_pending(r, c)
                rejected.append((c, self.coord.reject(c, r, 0, why)))
            contributors -= len(guarded.blamed)
            if guarded.state is not None and contributors >= d.min_quorum:
                new_state = guarded.state
            else:
                unusable = guarded.reason
        dropped = [(c, "no answer before the round closed") for c in closed.dropouts]
        dropped += [(c, f"failed: {why}") for c, why in closed.failed.items()]
        dropped.sort()
        self._closed = closed
        if new_state is None:
            reason = f"{contributors} accepted updates, below deploy.min_quorum = {d.min_quorum}"
            reason += collected.secure_error
            if unusable:
                reason = f"no usable model: {unusable}"
            return Attempt(state=None, rejected=rejected, dropped=dropped, reason=reason)
        # (client, examples, train loss): under SecAgg from the metadata sent in the clear at stage 0
        if closed.secure is not None:
            contributed = [
                Contribution(c, m.num_examples, m.metrics.get("train_loss"), closed.sizes.get(c, 0))
                for c, m in sorted(closed.secure.metas.items())
            ]
        else:
            contributed = [
                Contribution(
                    u.client_id, u.num_examples, u.metrics.get("train_loss"), closed.sizes.get(u.client_id, 0)
                )
                for u in closed.updates
            ]
        self._clients[r] = [c.client for c in contributed]
        metrics: dict[str, Any] = {"num_dropouts": len(closed.dropouts), "attempt": self._attempt}
        if self.privacy is not None:
            metrics["dp_amplification"] = self.privacy.amplification
            if not self.privacy.amplification:
                metrics["dp_amplification_reason"] = self.privacy.no_amplification
        metrics["max_client_compute_s"] = max(closed.compute_s.values(), default=0.0)
        if closed.secure is not None:
            metrics["secagg_error_bound"] = closed.secure.error_bound
        cpu_now = time.process_time()
        # CPU seconds of the whole server process, all threads, since the previous round's server step
        cpu_ms = 1000 * (cpu_now - (collected.cpu_at_open if self._cpu_mark is None else self._cpu_mark))
        self._cpu_mark = cpu_now
        timing = {"encode_broadcast_ms": round(collected.encode_ms, 2), **closed.timing}
        timing["server_cpu_ms"] = round(cpu_ms, 2)
        return Attempt(
            state=new_state,
            contributions=contributed,
            rejected=rejected,
            dropped=dropped,
            failed=len(closed.failed),
            metrics=metrics,
            bytes_down=closed.bytes_down,
            bytes_up=sum(c.bytes for c in contributed),
            opened_at=collected.opened_at,
            timing=timing,
        )

    def aborted(self, r: int, attempt: int, outcome: Attempt) -> None:
        reason = f"round {r} attempt {attempt}: {outcome.reason}"
        self.net.audit(r, -1, "", "round_aborted", 0, reason)
        closed = self._closed
        assert closed is not None
        self.log(
            "round_aborted",
            level="warning",
            round=r,
            attempt=attempt,
            reason=reason,
            dropouts=[self.coord.names[c] for c in closed.dropouts],
        )

    def site_evaluation(self, r: int, state: ServerState, due: bool) -> Mapping[str, Any]:
        """The round's selected sites evaluate ``state``'s model on their own test splits
        (:mod:`fedloom.net.evaluation`); its dropouts (likely gone) are not waited for again."""
        if self.evals is None or not due or self._cohort is None:
            return {}
        dropouts = set(self._closed.dropouts) if self._closed is not None else set()
        asked = [c for c in self._cohort if c not in dropouts]
        return evaluate_sites(self.evals, self.cfg, r, state.params, asked, self.log)

    def committed(self, state: ServerState, metrics: Mapping[str, Any], timing: dict[str, float]) -> None:
        r = state.round
        self.net.clear_pending(r)
        self.net.audit(r, -1, "", "round_committed", 0, json.dumps({"clients": self._clients.pop(r, [])}))
        self.coord.finish(metrics)
        self.log("round_committed", **metrics, phases=timing)


def _aggregate(
    cfg: ExperimentConfig,
    algorithm: Algorithm,
    pipeline: Pipeline,
    state: ServerState,
    closed: Closed,
    broadcast: Broadcast,
    ctx: ServerContext,
) -> tuple[Guarded, Closed]:
    """The guarded server step of the round (:func:`fedloom.net.guard.guarded_apply`) and ``closed``
    without the updates it left out."""
    precomputed = None
    if closed.secure is not None:
        from fedloom.secagg.updates import aggregate_from_sum

        precomputed = aggregate_from_sum(
            closed.secure.total,
            broadcast.params,
            max_weight=cfg.secagg.max_weight,
            num_clients=len(closed.secure.included),
        )
    guarded = guarded_apply(algorithm, pipeline, state, closed.updates, ctx, precomputed=precomputed)
    kept = [u for u in closed.updates if u.client_id not in guarded.blamed]
    return guarded, dataclasses.replace(closed, updates=kept)


def _secure_relay(
    cfg: ExperimentConfig, cohort: list[int], target: int, broadcast: Broadcast, r: int
) -> SecureRelay | None:
    """A fresh :class:`~fedloom.net.secure.SecureRelay` for this attempt, or ``None`` without SecAgg."""
    sa = cfg.secagg
    if not sa.enabled:
        return None
    from fedloom.net.secure import SecureParams, SecureRelay, cohort_graph

    graph = cohort_graph(sa.graph, cohort, sa.degree, numpy_rng(cfg.seed, "secagg-graph", round=r))
    params = SecureParams.fresh(
        graph,
        threshold=sa.threshold,
        bits=sa.bits,
        length=broadcast.params.num_elements() + 1,
        clip=max(1.0, cfg.update_norm_bound()),
        max_weight=sa.max_weight,
        quant_bits=cfg.compression.bits if cfg.compression.codec == "qsgd" else 0,
    )
    return SecureRelay(
        params,
        graph,
        target=target,
        deadline=time.monotonic() + cfg.deploy.deadline_s,
        stage_timeout_s=cfg.deploy.deadline_s,
    )


def draw_cohort(
    cfg: ExperimentConfig, r: int, population: int, n: int, online: list[int] | None, secret: bytes
) -> list[int]:
    """Round ``r``'s cohort: ``n`` clients (fewer if fewer are online) among ``online`` (``None``: all).

    From ``secret`` (DP, see :func:`~fedloom.sim.sampling.secret_sample`), else from (seed, round):
    over the whole registry this is :func:`~fedloom.sim.sampling.sample_clients`, the simulation's.
    """
    if secret:
        candidates = online if online is not None else list(range(population))
        return secret_sample(secret, r, candidates, min(n, len(candidates)))
    if online is None:
        return [int(c) for c in sample_clients(cfg.seed, r, population, n)]
    picks = numpy_rng(cfg.seed, "client-sampling", round=r).choice(
        len(online), size=min(n, len(online)), replace=False
    )
    return sorted(online[int(i)] for i in picks)


def _wait_for_clients(
    coord: Coordinator, quorum: int, limit_s: float, r: int, log: JsonLog, committer: ThreadedCommitter
) -> None:
    end = time.monotonic() + limit_s
    said = -1
    while True:
        online = len(coord.online())
        if online >= quorum:
            return
        committer.flush()  # no need to hold the previous round's commit back while waiting
        if online != said:
            log("waiting_for_clients", round=r, online=online, needed=quorum)
            said = online
        if time.monotonic() >= end:
            raise TrainingError(
                f"round {r}: only {online} clients online after {limit_s:.0f} s, "
                f"deploy.min_quorum = {quorum} needed"
            )
        time.sleep(0.05)
