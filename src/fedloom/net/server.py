"""The deployed server: ``run_server`` serves an experiment to its clients until the run ends.

It opens the state directory (a new run, or the run it holds: see
:mod:`fedloom.engine.resume`), starts the gRPC service (:mod:`fedloom.net.service`) on its
own event loop (:mod:`fedloom.net.serving`) and runs the round engine
(:mod:`fedloom.engine.rounds`) on the caller's thread with a
:class:`~fedloom.net.driver.DeploymentDriver`; the service and the driver share the
:class:`~fedloom.net.coordinator.Coordinator`. A finished round is committed on a thread of
its own once the next round is open (:class:`~fedloom.engine.commit.ThreadedCommitter`).
The run's events go to ``events.jsonl`` in the state directory, next to ``metrics.jsonl``,
and to the observers given.

Resume: a server started on a state directory that holds a run continues it from its last
checkpoint, with the same cohort for the interrupted round and the updates that round had
already accepted (the pending updates, see :mod:`fedloom.net.state`). Because cohorts depend
only on (seed, round), aggregation order only on client ids, and clients train
deterministically from (seed, round, client), a run killed and resumed ends with the same
model, bit for bit, as an uninterrupted one -- provided every selected client answers within
the deadline (the quorum/deadline outcome of a round that closes on time is inherently
timing dependent). A server stopped by an error (a round below quorum, a full disk) answers
its clients WAIT with the reason (``TaskReply.message``), never DONE, so they keep
reconnecting and a restarted server resumes the run with them.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
from collections.abc import Sequence
from pathlib import Path

from fedloom.algorithms.api import ServerState
from fedloom.algorithms.requirements import requirements_of
from fedloom.config.loader import config_to_toml
from fedloom.config.schema import ExperimentConfig
from fedloom.core.errors import ConfigError, FedloomError, RunStateError
from fedloom.engine.commit import ThreadedCommitter
from fedloom.engine.evaluation import EvalData
from fedloom.engine.events import Observer
from fedloom.engine.resume import open_run
from fedloom.engine.rounds import PRIVACY_BUDGET, TARGET_REACHED, RoundEngine
from fedloom.net.auth import TokenBook
from fedloom.net.coordinator import Coordinator
from fedloom.net.driver import DeploymentDriver
from fedloom.net.evaluation import SiteEvaluation
from fedloom.net.logs import JsonLog
from fedloom.net.service import Service
from fedloom.net.serving import AsyncServer, ServerOptions
from fedloom.net.state import NetState
from fedloom.net.transport import check_plaintext
from fedloom.sim.build import build_algorithm, build_pipeline, task_for
from fedloom.sim.privacy_plan import plan_privacy
from fedloom.sim.sampling import cohort_size
from fedloom.tasks.task import task_workspace
from fedloom.trackers import check_tracking_extras

__all__ = ["ServerOptions", "client_names", "run_server"]

ENDPOINT = "endpoint"
# meta key of the run's cohort secret (hex): generated at run start, kept in the state db, never sent
COHORT_SECRET = "cohort_secret"


def client_names(cfg: ExperimentConfig) -> list[str]:
    """The ordered registry of expected clients (a client's id is its index)."""
    return list(cfg.deploy.clients) or [str(i) for i in range(cfg.data.num_clients)]


def run_server(
    cfg: ExperimentConfig,
    state_dir: Path,
    options: ServerOptions,
    log: JsonLog,
    *,
    observers: Sequence[Observer] = (),
) -> ServerState:
    """Serve the experiment until a stopping rule holds (round budget, target accuracy, privacy budget); resumable.

    Without TLS (``options.tls.cert``) ``options.listen`` must be a loopback address unless
    ``options.insecure`` (:class:`~fedloom.net.transport.InsecureTransportError` otherwise).
    Every event of the run (see :mod:`fedloom.engine.events`) is appended to ``events.jsonl``
    in ``state_dir`` and handed to each of ``observers``.
    """
    if (options.tls.cert is None or options.tls.key is None) and check_plaintext(
        options.listen, insecure=options.insecure, role="server --listen"
    ):
        log("plaintext", level="warning", listen=options.listen, reason="insecure=True: no TLS")
    check_tracking_extras(cfg)  # before anything starts: a missing extra is a configuration error
    names = client_names(cfg)
    d = cfg.deploy
    if cfg.sampling.scheme != "fixed":
        raise ConfigError(
            [
                f"sampling.scheme = {cfg.sampling.scheme!r}: the deployment selects fixed-size cohorts "
                "(a deployed round needs deploy.min_quorum answers, which a Poisson draw cannot promise); "
                "use 'fixed' (DP accounting then uses RDP)"
            ]
        )
    population = len(names)
    size = cohort_size(population, cfg.sampling.fraction, cfg.sampling.min_clients)
    if d.min_quorum > size:
        raise RunStateError(f"deploy.min_quorum = {d.min_quorum} exceeds the cohort size {size}")
    if len(set(names)) != len(names):
        raise RunStateError(f"deploy.clients has duplicate names: {names}")
    selected_n = min(population, math.ceil(size * d.overselect - 1e-9))
    algorithm, pipeline = (
        build_algorithm(cfg),
        build_pipeline(cfg, plan_privacy(cfg, population=population, secure_noise=True, deployed=True)),
    )
    workspace, initial = task_workspace(
        task_for(cfg, search=options.search), seed=cfg.seed, device=cfg.device or None
    )
    _check_secagg(cfg, initial.num_elements() + 1)
    run = open_run(cfg, state_dir, lambda: algorithm.server_init(initial), resume=None, option="--state-dir")
    store = run.store
    with store, NetState(store.path) as net:
        if run.resumed:
            run_id = store.get_meta("run_id") or ""
            secret = store.get_meta(COHORT_SECRET) or ""  # none recorded: cohorts from the seed
            log("resume", round=run.state.round, state_dir=str(state_dir))
        else:
            toml = config_to_toml(cfg)
            run_id = hashlib.sha256(f"{toml}{time.time()}".encode()).hexdigest()[:16]
            store.set_meta("run_id", run_id)
            secret = secrets.token_hex(32)
            store.set_meta(COHORT_SECRET, secret)
        coord = Coordinator(
            names,
            net,
            pipeline,
            log,
            max_update_norm=d.max_update_norm,
            offline_after_s=d.offline_after_s,
            requirements=requirements_of(algorithm),
            max_weight=d.max_weight,
            weighting=d.weighting,
        )
        if run.history:
            coord.finish(run.history[-1])
        tokens = TokenBook(options.tokens) if options.tokens is not None else None
        mtls = options.tls.ca is not None and options.tls.cert is not None
        evals = SiteEvaluation(names, sorted(workspace.metrics), net, log)
        service = Service(coord, cfg, tokens, mtls, net, log, run_id, evals)
        server = AsyncServer(service, cfg, options)
        port = server.start()
        host = options.listen.rsplit(":", 1)[0]
        (state_dir / ENDPOINT).write_text(f"{host}:{port}\n", encoding="utf-8")
        log(
            "listening",
            address=f"{host}:{port}",
            port=port,
            tls=options.tls.cert is not None,
            mutual_tls=mtls,
            tokens=tokens is not None,
            clients=names,
            round=run.state.round,
        )
        privacy = plan_privacy(cfg, population=population, deployed=True)
        try:
            with ThreadedCommitter() as committer:
                driver = DeploymentDriver(
                    cfg,
                    coord,
                    net,
                    algorithm,
                    pipeline,
                    privacy,
                    log,
                    committer,
                    evals=evals,
                    selected_n=selected_n,
                    size=size,
                    secret=bytes.fromhex(secret),
                )
                engine = RoundEngine(
                    cfg,
                    run,
                    driver,
                    algorithm=algorithm,
                    pipeline=pipeline,
                    privacy=privacy,
                    evaluation=EvalData(workspace=workspace, test=options.eval_data),
                    committer=committer,
                    observers=observers,
                    info={"clients": names, "run_id": run_id},
                )
                done = engine.run()
            if done.reason == PRIVACY_BUDGET and privacy is not None:
                log(
                    "privacy_budget_reached",
                    round=done.state.round + 1,
                    epsilon=privacy.epsilon_after(done.state.round),
                )
            elif done.reason == TARGET_REACHED:
                log("target_reached", round=done.state.round)
            net.drop_free_slots()
            coord.set_done()
            log("done", round=done.state.round, metrics=coord.last_metrics)
            end = time.monotonic() + options.linger_s
            while time.monotonic() < end and not coord.everyone_told_done():
                time.sleep(0.1)
        except FedloomError as exc:
            # Not "done": the run resumes when the server is restarted, so the clients keep
            # reconnecting (until their --give-up-after) rather than exit.
            coord.set_stopping(f"the server stopped: {exc}")
            log("failed", level="error", error=str(exc))
            time.sleep(min(options.linger_s, 2.0))
            raise
        finally:
            server.stop(grace=1.0)
    return done.state


def _check_secagg(cfg: ExperimentConfig, length: int) -> None:
    """Refuse, before serving, a secure-aggregation setup that could never complete a round."""
    if not cfg.secagg.enabled:
        return
    from fedloom.secagg.fixedpoint import wire_bytes_per_element

    problems = []
    if cfg.secagg.max_weight <= 0:
        problems.append("secagg.max_weight must be > 0 in deployment (a public bound on client weights)")
    # The masked vector travels as base64 in one unchunked message.
    need = 4 * math.ceil(wire_bytes_per_element(cfg.secagg.bits) * length / 3) + 1024
    if need > cfg.deploy.max_message_bytes:
        problems.append(
            f"secagg: a masked update needs about {need} bytes in one message, over "
            f"deploy.max_message_bytes = {cfg.deploy.max_message_bytes}"
        )
    if problems:
        raise RunStateError("; ".join(problems))
