"""The client process: join, pull tasks, train with the experiment's algorithm, push the update.

A client's local work is exactly the simulation's (:func:`fedloom.sim.executor.run_client`):
``algorithm.client_update(workspace, broadcast, client_state, data, ClientContext(seed,
round, id))`` followed by ``pipeline.client(update, ServerContext(...))``. The client
learns the experiment (config TOML), its id and the population from the server at
:rpc:`Join`, so client and server can never disagree on them.

Persistent client state (``ClientUpdate.client_state``, e.g. SCAFFOLD's control
variate) stays on the client, on disk, one safetensors file per round in its state
directory: round ``r`` trains from the newest state committed *before* ``r``, so a
round retried after a server restart starts from the same state and yields the
same update. A round's new state is committed only when the server accepts its
update (a rejected or late update leaves the state where it was, as in the
simulation); when the upload's reply is lost, the next Join asks the server
whether it holds the update (:class:`ClientStateStore`).

When the server is unreachable the client retries with exponential backoff (0.5 s
doubling to 15 s, with a fixed per-client offset so clients do not stampede), then
re-joins; it gives up after ``give_up_after_s`` without contact (exit code 4), logging
the likely cause of the failed connections (:func:`fedloom.net.transport.explain_connect_failure`).
Credentials that the server refuses, and a TLS handshake that fails on this side (the
server's certificate does not verify against this client's CA, or the server does not
speak TLS), end the process at once with exit code 3.

The client runs only code its own operator configured: a server config that names code
(``model.name = "package.module:Class"``) must match the client's local experiment file
(``ClientOptions.local_config``), else the client refuses to join with exit code 5 before
importing anything (see :mod:`fedloom.net.trust`).

Evaluation rounds (an ``EVALUATE`` task, see :mod:`fedloom.net.evaluation`): the client
downloads the round's global model, evaluates it with its task's loss and metrics on its own
test split (``load_test``; the split never leaves the site) and answers with the ``Evaluate`` RPC:
the loss, each metric (an undefined one, e.g. AUC on a split with one class, listed as such) and
the number of examples. A client without a test split answers that it has none.

When the task carries SecAgg parameters (``secagg.enabled``) the update is never
uploaded: the client takes part in the four SecAgg stages instead (see
:mod:`fedloom.net.secure`), sending its masked ``flatten_weighted`` vector and, in
the clear, only the update's metadata (weight, counts, train loss, compute time).
"""

from __future__ import annotations

import json
import math
import threading
import time
import tomllib
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from fedloom.algorithms.api import (
    Algorithm,
    Broadcast,
    ClientContext,
    ClientState,
    ClientUpdate,
    ServerContext,
    Workspace,
)
from fedloom.algorithms.local import client_update_with_state
from fedloom.config.loader import parse_config
from fedloom.config.schema import ExperimentConfig
from fedloom.core.errors import ConfigError, FedloomError, RunStateError, TrainingError, UpdateError
from fedloom.core.rng import numpy_rng
from fedloom.core.serde import slots_from_bytes, slots_to_bytes
from fedloom.data.datasets import ArrayDataset
from fedloom.net.auth import Credentials
from fedloom.net.logs import JsonLog
from fedloom.net.proto import fedloom_pb2 as pb
from fedloom.net.proto import fedloom_pb2_grpc as pbg
from fedloom.net.transport import check_plaintext, explain_connect_failure
from fedloom.net.trust import UntrustedConfigError, check_server_config
from fedloom.net.wire import (
    chunk_size_for,
    decode_broadcast,
    encode_chunk,
    fingerprint,
    iter_chunks,
    model_digest,
    patched_broadcast,
    pieces_size,
    split_bytes_field,
    update_pieces,
)
from fedloom.sim.build import build_algorithm, build_pipeline, check_fits, task_for
from fedloom.sim.evaluate import evaluate
from fedloom.sim.privacy_plan import plan_privacy
from fedloom.tasks.task import Task, check_task, task_workspace
from fedloom.transforms.pipeline import Pipeline

__all__ = [
    "EXIT_AUTH",
    "EXIT_GAVE_UP",
    "EXIT_UNTRUSTED_CONFIG",
    "ClientOptions",
    "ClientStateStore",
    "NetClient",
    "Work",
    "fetch_status",
    "make_channel",
]

EXIT_AUTH = 3
EXIT_GAVE_UP = 4
EXIT_UNTRUSTED_CONFIG = 5

# The client's local work for one round: (broadcast, stored state, ids) -> the pipeline-encoded update.
Work = Callable[[Broadcast, ClientState | None, ClientContext, ServerContext], ClientUpdate]


@dataclass(frozen=True)
class ClientOptions:
    server: str
    name: str
    token: str = ""
    tls: Credentials = field(default_factory=Credentials)
    state_dir: Path | None = None
    give_up_after_s: float = 300.0
    poll_s: float = 10.0
    insecure: bool = False
    local_config: ExperimentConfig | None = None
    search: tuple[Path, ...] = ()
    device: str = ""


def make_channel(
    server: str, tls: Credentials, max_message_bytes: int, *, insecure: bool = False
) -> grpc.Channel:
    """A channel to ``server``: TLS when ``tls.ca`` is set, else plaintext, which a non-loopback
    ``server`` allows only with ``insecure=True`` (see :mod:`fedloom.net.transport`)."""
    opts = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    ca, cert, key = tls.read()
    if ca is None:
        check_plaintext(server, insecure=insecure, role="client --server")
        return grpc.insecure_channel(server, options=opts)
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    return grpc.secure_channel(server, creds, options=opts)


class ClientStateStore:
    """Per-round client state files ``state-r<round>.safetensors`` in one directory.

    A round's new state is first *staged* (``staged-r<round>.safetensors``) and becomes the state
    later rounds train from only once the server accepted the update it belongs to
    (:meth:`commit`); a rejected or late update's state is dropped (:meth:`discard`), as the
    simulation keeps only the states of aggregated updates. A staged state whose upload got no
    reply (the connection broke) is settled at the next Join, which asks the server.
    """

    def __init__(self, directory: Path, run_id: str, *, keep: int = 3) -> None:
        self.dir = directory
        self.keep = keep
        directory.mkdir(parents=True, exist_ok=True)
        marker = directory / "run_id"
        if marker.exists() and marker.read_text(encoding="utf-8").strip() != run_id:
            for p in [*directory.glob("state-r*.safetensors"), *directory.glob("staged-r*.safetensors")]:
                p.unlink()  # state of another run must not leak into this one
        marker.write_text(run_id + "\n", encoding="utf-8")

    def _rounds(self) -> list[int]:
        return sorted(int(p.stem.removeprefix("state-r")) for p in self.dir.glob("state-r*.safetensors"))

    def load(self, before: int) -> ClientState | None:
        """The newest committed state of a round earlier than ``before`` (None: never trained)."""
        earlier = [r for r in self._rounds() if r < before]
        if not earlier:
            return None
        blob = (self.dir / f"state-r{earlier[-1]:06d}.safetensors").read_bytes()
        return ClientState(values=slots_from_bytes(blob))

    def save(self, round: int, state: ClientState) -> None:
        """Stage and commit ``state`` as round ``round``'s in one step."""
        self.stage(round, state)
        self.commit()

    def stage(self, round: int, state: ClientState) -> None:
        """Hold ``state`` as round ``round``'s until :meth:`commit` or :meth:`discard` (one at a time)."""
        self.discard()
        path = self.dir / f"staged-r{round:06d}.safetensors"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(slots_to_bytes(state.values))
        tmp.replace(path)

    def commit(self) -> None:
        """Make the staged state (if any) the state of its round."""
        r = staged_round(self.dir)
        if r == 0:
            return
        (self.dir / f"staged-r{r:06d}.safetensors").replace(self.dir / f"state-r{r:06d}.safetensors")
        for old in self._rounds()[: -self.keep]:
            (self.dir / f"state-r{old:06d}.safetensors").unlink(missing_ok=True)

    def discard(self) -> None:
        """Drop the staged state, if any."""
        for p in self.dir.glob("staged-r*.safetensors"):
            p.unlink(missing_ok=True)


def staged_round(directory: Path | None) -> int:
    """The round of the state staged in ``directory`` (0: none); see :class:`ClientStateStore`."""
    if directory is None or not directory.is_dir():
        return 0
    rounds = [int(p.stem.removeprefix("staged-r")) for p in directory.glob("staged-r*.safetensors")]
    return max(rounds, default=0)


def algorithm_work(
    algorithm: Algorithm,
    pipeline: Pipeline,
    workspace: Workspace,
    data: ArrayDataset,
    *,
    secure: bool = False,
) -> Work:
    """The simulation's local work (sim.executor.run_client), as a :data:`Work`.

    With ``secure`` (secure aggregation), the update also goes through the
    pipeline's per-update server step (``decode``) here: the server only ever sees
    the masked sum, so the client applies what the simulation applies to each
    update before its secure sum (the DP stages' uniform weights, a clip stage's
    bound check).
    """

    def work(b: Broadcast, cs: ClientState | None, cctx: ClientContext, sctx: ServerContext) -> ClientUpdate:
        update = pipeline.client(client_update_with_state(algorithm, workspace, b, cs, data, cctx), sctx)
        return pipeline.decode(update, sctx) if secure else update

    return work


class NetClient:
    """One client's life: see the module docstring. :meth:`serve` returns an exit code."""

    def __init__(
        self,
        options: ClientOptions,
        log: JsonLog,
        *,
        load_data: Callable[[ExperimentConfig, Task], ArrayDataset] | None = None,
        work: Callable[[ExperimentConfig], Work] | None = None,
        load_test: Callable[[ExperimentConfig, Task], ArrayDataset | None] | None = None,
    ) -> None:
        """``load_data``: this site's training data (fedloom trains); ``work``: a custom trainer instead;
        ``load_test``: this site's test split for evaluation rounds (``None``, or returning ``None``: none)."""
        if load_data is None and work is None:
            raise ValueError("NetClient needs load_data (real training) or work (a custom trainer)")
        self.o = options
        self.log = log
        self._load_data = load_data
        self._make_work = work
        self._load_test = load_test
        self._work: Work | None = None
        # (the workspace, the test split) evaluation rounds use; None: this site has no test split
        self._evaluation: tuple[Workspace, ArrayDataset] | None = None
        self._run_id = ""
        self._cfg: ExperimentConfig | None = None
        self._states: ClientStateStore | None = None
        self._md = (("fedloom-client", options.name), ("fedloom-token", options.token))
        # compression.downlink_patch: (digest, blob) of the last broadcast trained on, for patches
        self._held: tuple[str, bytes] | None = None
        self._offset = 1.0 + (zlib.crc32(options.name.encode()) % 100) / 200.0
        self.rounds_done: list[int] = []

    def _setup(self, reply: pb.JoinReply) -> None:
        if self._work is not None and reply.run_id == self._run_id:
            return
        cfg = parse_config(tomllib.loads(reply.config_toml))
        problems = check_server_config(cfg, self.o.local_config)
        if problems:  # before anything named in the config is imported
            raise UntrustedConfigError(problems)
        self._cfg, self._run_id = cfg, reply.run_id
        if self._make_work is not None:
            self._work = self._make_work(cfg)
        elif self._load_data is not None:
            task = self._task(cfg)
            workspace, _ = task_workspace(task, seed=cfg.seed, device=self.o.device or None)
            data = self._load_data(cfg, task)
            check_task(task, workspace, data, "this client's training data")
            check_fits(cfg, workspace)
            privacy = plan_privacy(
                cfg, population=len(cfg.deploy.clients) or None, secure_noise=True, deployed=True
            )
            pipeline = build_pipeline(cfg, privacy)
            self._work = algorithm_work(
                build_algorithm(cfg), pipeline, workspace, data, secure=cfg.secagg.enabled
            )
            test = self._load_test(cfg, task) if self._load_test is not None else None
            if test is not None and len(test) > 0:
                check_task(task, workspace, test, "this client's test data")
                self._evaluation = (workspace, test)
            self.log(
                "data_loaded", examples=len(data), test_examples=len(test) if test else 0, task=task.name
            )
        if self.o.state_dir is not None:
            self._states = ClientStateStore(self.o.state_dir, reply.run_id)

    def _task(self, cfg: ExperimentConfig) -> Task:
        """This site's task: its operator's (local config, with its own task_args), else the built-in one.

        The server's ``task`` has already been checked against the local one
        (:func:`~fedloom.net.trust.check_server_config`); a local task the server does not run
        is refused, since the two would train different models.
        """
        local = self.o.local_config
        if local is not None and local.task:
            if cfg.task != local.task:
                raise ConfigError(
                    [
                        f"task: this client's configuration names {local.task!r} but the server runs "
                        f"{cfg.task or 'the built-in task'!r}"
                    ]
                )
            return task_for(local, search=self.o.search)
        if local is not None and ":" in local.data.dataset:
            # The server's data.dataset equals this one (check_server_config); import it from here.
            return task_for(local, search=self.o.search)
        return task_for(cfg)

    def serve(self) -> int:
        tls = self.o.tls.ca is not None
        if not tls and check_plaintext(self.o.server, insecure=self.o.insecure, role="client --server"):
            self.log("plaintext", level="warning", server=self.o.server, reason="insecure=True: no TLS")
        failures = 0
        said = ""
        last_contact = time.monotonic()
        max_msg = 4 * 1024 * 1024
        cause = ""
        while True:
            channel = make_channel(self.o.server, self.o.tls, max_msg, insecure=self.o.insecure)
            stop = threading.Event()
            hb: threading.Thread | None = None
            try:
                stub = pbg.CoordinatorStub(channel)  # type: ignore[no-untyped-call]
                unsettled = staged_round(self.o.state_dir)
                reply = stub.Join(
                    pb.JoinRequest(client_name=self.o.name, unsettled_round=unsettled),
                    metadata=self._md,
                    timeout=10,
                )
                if reply.max_message_bytes != max_msg:
                    max_msg = int(reply.max_message_bytes)
                    channel.close()
                    channel = make_channel(self.o.server, self.o.tls, max_msg, insecure=self.o.insecure)
                    stub = pbg.CoordinatorStub(channel)  # type: ignore[no-untyped-call]
                try:
                    self._setup(reply)
                except UntrustedConfigError as exc:
                    self.log("config_refused", level="error", problems=exc.problems, reason=str(exc))
                    return EXIT_UNTRUSTED_CONFIG
                self._settle(unsettled, reply.unsettled_accepted)
                self.log("joined", id=reply.client_id, population=reply.population, run_id=reply.run_id)
                failures, last_contact = 0, time.monotonic()
                hb = threading.Thread(
                    target=self._heartbeat, args=(stub, reply.heartbeat_s, stop), daemon=True
                )
                hb.start()
                raw = _RawCalls(channel)
                while True:
                    held = self._held[0] if self._held is not None else ""
                    task, inline = raw.task(
                        pb.TaskRequest(wait_s=self.o.poll_s, held_digest=held),
                        metadata=self._md,
                        timeout=self.o.poll_s + 15,
                    )
                    last_contact = time.monotonic()
                    if task.kind == pb.DONE:
                        self.log("done", rounds=len(self.rounds_done))
                        return 0
                    if task.kind == pb.WAIT and task.message and task.message != said:
                        # e.g. the server stops after a failed round: wait for it to be restarted
                        self.log("server_says", level="warning", message=task.message)
                    said = task.message
                    if task.kind == pb.TRAIN:
                        self._round(stub, raw, task, inline, reply, chunk_size_for(max_msg))
                    elif task.kind == pb.EVALUATE:
                        self._evaluate(stub, task)
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    self.log(
                        "refused", level="error", reason=exc.details() if hasattr(exc, "details") else ""
                    )
                    return EXIT_AUTH
                if code == grpc.StatusCode.UNAVAILABLE:
                    cause, permanent = explain_connect_failure(_details(exc), tls=tls)
                    if permanent:  # this side's TLS setup cannot work with this server: retrying cannot help
                        self.log("tls_failed", level="error", server=self.o.server, reason=cause)
                        return EXIT_AUTH
                failures += 1
                delay = min(15.0, 0.5 * 2 ** min(failures - 1, 5)) * self._offset
                away = time.monotonic() - last_contact
                if away > self.o.give_up_after_s:
                    self.log("gave_up", level="error", away_s=round(away, 1), reason=cause)
                    return EXIT_GAVE_UP
                self.log(
                    "server_unreachable",
                    level="warning",
                    code=str(code),
                    reason=cause,
                    retry_in_s=round(delay, 2),
                )
                time.sleep(delay)
            finally:
                stop.set()
                if hb is not None:
                    hb.join()  # a daemon thread inside grpc at interpreter exit aborts the process
                channel.close()

    def _settle(self, round: int, accepted: bool) -> None:
        """Commit or drop the state staged for ``round``, whose upload got no reply; the server said
        whether it holds that update (``accepted``)."""
        if self._states is None or round == 0 or staged_round(self._states.dir) != round:
            return  # nothing staged, or it belonged to another run and is gone
        if accepted:
            self._states.commit()
        else:
            self._states.discard()
        self.log("state_settled", round=round, committed=accepted)

    def _heartbeat(self, stub: pbg.CoordinatorStub, every: float, stop: threading.Event) -> None:
        while not stop.wait(every):
            try:
                stub.Heartbeat(pb.HeartbeatRequest(phase="alive"), metadata=self._md, timeout=every)
            except grpc.RpcError:
                return  # the main loop notices and reconnects

    def _round(
        self,
        stub: pbg.CoordinatorStub,
        raw: _RawCalls,
        task: pb.TaskReply,
        inline: memoryview | None,
        join: pb.JoinReply,
        chunk: int,
    ) -> None:
        """Train round ``task.round``: the broadcast came with the task (``inline``) or is streamed now."""
        if self._cfg is None or self._work is None:
            raise RunStateError("a task arrived before the client joined")
        r = task.round
        base = task.patch_base_digest
        blob: bytes | memoryview = inline if inline is not None else self._download(stub, task, base)
        # The digest names the model; XXH3-64 catches a damaged download at a twentieth of SHA-256's cost
        # (integrity against an attacker is TLS's job: whoever could alter the blob could alter both).
        if fingerprint(blob) != task.broadcast_xxh3:
            raise RunStateError(f"round {r}: the downloaded model does not match its XXH3 checksum")
        if base:
            blob = self._patched(stub, task, blob)
        broadcast = decode_broadcast(blob, r, self._cfg.compression.downlink)
        if self._cfg.compression.downlink_patch:
            self._held = (task.broadcast_digest, bytes(blob))
        cs = self._states.load(before=r) if self._states is not None else None
        cctx = ClientContext(seed=self._cfg.seed, round=r, client_id=join.client_id)
        sctx = ServerContext(seed=self._cfg.seed, round=r, population=join.population)
        t0 = time.perf_counter()
        try:
            update = self._work(broadcast, cs, cctx, sctx)
        except FedloomError as exc:
            kind = "diverged" if isinstance(exc, TrainingError) else "error"
            self.log("train_failed", level="warning", round=r, reason=str(exc))
            header = pb.UpdateHeader(
                round=r, broadcast_digest=task.broadcast_digest, failure=f"{kind}: {exc}"
            )
            raw.push(encode_chunk(b"", header), metadata=self._md, timeout=30)
            return
        compute = time.perf_counter() - t0
        if self._states is not None:
            # Committed only once the server accepts the update (see ClientStateStore).
            if update.client_state is not None:
                self._states.stage(r, update.client_state)
            else:
                self._states.discard()
        if task.secagg_json:
            self._secure(stub, raw, task, join.client_id, update, compute)
            return
        meta, pieces = update_pieces(update, compute_s=compute)
        size = pieces_size(pieces)
        transfer = "unary" if size <= chunk and inline is not None else "stream"
        if size <= chunk:  # fits one message: a unary call, the update copied once into it
            header = pb.UpdateHeader(
                round=r, broadcast_digest=task.broadcast_digest, total_bytes=size, meta_json=meta
            )
            reply = raw.push(encode_chunk(pieces, header), metadata=self._md, timeout=60)
        else:
            ublob = b"".join(pieces)
            reply = stub.Upload(
                upload_chunks(r, task.broadcast_digest, meta, ublob, chunk), metadata=self._md, timeout=60
            )
        self.rounds_done.append(r)
        if self._states is not None:
            if reply.accepted:
                self._states.commit()
            else:
                self._states.discard()
        if reply.accepted:
            self.log("update_accepted", round=r, bytes=size, compute_s=round(compute, 4), transfer=transfer)
        else:
            self.log("update_rejected", level="warning", round=r, reason=reply.error)

    def _download(self, stub: pbg.CoordinatorStub, task: pb.TaskReply, base: str = "") -> bytes:
        """Stream round ``task.round``'s broadcast (with ``base``: its patch against that broadcast)."""
        request = pb.DownloadRequest(
            round=task.round, broadcast_digest=task.broadcast_digest, patch_base_digest=base
        )
        timeout = max(30.0, task.deadline_in_s)
        return b"".join(c.data for c in stub.Download(request, metadata=self._md, timeout=timeout))

    def _patched(self, stub: pbg.CoordinatorStub, task: pb.TaskReply, patch: bytes | memoryview) -> bytes:
        """The broadcast that ``patch`` makes of the held one, checked against ``task.broadcast_digest``.

        A patch that does not fit (not the held broadcast, or it rebuilds another model) is logged and
        the whole broadcast downloaded instead, checked against the same digest.
        """
        r = task.round
        try:
            if self._held is None or self._held[0] != task.patch_base_digest:
                raise UpdateError(f"round {r}: a patch against a broadcast this client does not hold")
            blob = patched_broadcast(self._held[1], patch, task.broadcast_digest, r)
        except UpdateError as exc:
            self.log("patch_refused", level="warning", round=r, reason=str(exc))
            self._held = None
            blob = self._download(stub, task)
            if model_digest(blob) != task.broadcast_digest:
                raise RunStateError(
                    f"round {r}: the downloaded model is not the one named {task.broadcast_digest[:12]}"
                ) from None
            return blob
        self.log("broadcast_patched", round=r, bytes=len(patch), whole=len(blob))
        return blob

    def _evaluate(self, stub: pbg.CoordinatorStub, task: pb.TaskReply) -> None:
        """Evaluate round ``task.round``'s global model on this site's test split and report it."""
        if self._cfg is None:
            raise RunStateError("a task arrived before the client joined")
        r = task.round
        report = pb.EvalReport(round=r, model_digest=task.broadcast_digest)
        if self._evaluation is None:
            report.unavailable = "this site has no test split"
        else:
            workspace, test = self._evaluation
            try:
                request = pb.DownloadRequest(round=r, broadcast_digest=task.broadcast_digest)
                timeout = max(30.0, task.deadline_in_s)
                blob = b"".join(c.data for c in stub.Download(request, metadata=self._md, timeout=timeout))
                if fingerprint(blob) != task.broadcast_xxh3:
                    raise RunStateError(f"round {r}: the downloaded model does not match its XXH3 checksum")
                params = decode_broadcast(blob, r).params
                ev = evaluate(workspace, params, test, batch_size=self._cfg.eval.batch_size)
            except FedloomError as exc:
                report.unavailable = f"error: {exc}"
                self.log("evaluation_failed", level="warning", round=r, reason=str(exc))
            else:
                report.num_examples = ev.num_examples
                report.loss = ev.loss
                for name, value in ev.metrics.items():
                    if math.isfinite(value):
                        report.metrics[name] = value
                    else:
                        report.undefined.append(name)
        reply = stub.Evaluate(report, metadata=self._md, timeout=30)
        if reply.accepted:
            self.log("evaluated", round=r, examples=report.num_examples, metrics=dict(report.metrics))
        else:
            self.log("evaluation_refused", level="warning", round=r, reason=reply.error)

    def _secure(
        self,
        stub: pbg.CoordinatorStub,
        raw: _RawCalls,
        task: pb.TaskReply,
        cid: int,
        update: ClientUpdate,
        compute: float,
    ) -> None:
        """Run the four SecAgg stages for ``update`` (the client side of :mod:`fedloom.net.secure`)."""
        from fedloom.net.secure import SecureParams
        from fedloom.net.wire import UpdateMeta, decode_secagg, encode_secagg
        from fedloom.secagg import client as sa
        from fedloom.secagg.fixedpoint import encode
        from fedloom.secagg.messages import Roster, ShareInbox, UnmaskRequest
        from fedloom.secagg.updates import flatten_weighted

        r = task.round
        p = SecureParams.from_json(task.secagg_json)
        meta = UpdateMeta(
            weight=update.weight,
            num_examples=update.num_examples,
            num_steps=update.num_steps,
            metrics=update.metrics,
            compute_s=compute,
        ).to_json()
        timeout = task.deadline_in_s + 4 * 60.0

        def call(stage: int, message: object, meta_json: str = "") -> bytes | None:
            reply = stub.SecAgg(
                pb.SecAggRequest(
                    round=r,
                    stage=stage,
                    payload=encode_secagg(message),
                    meta_json=meta_json,
                    session=p.session.hex(),
                ),
                metadata=self._md,
                timeout=timeout,
            )
            if reply.error:
                self.log("secagg_dropped", level="warning", round=r, stage=stage, reason=reply.error)
                return None
            return bytes(reply.payload)

        try:
            vector = flatten_weighted(update, max_weight=p.max_weight)
            if p.quant_bits:  # compression.codec = "qsgd": stochastic rounding onto the narrow ring
                from fedloom.transforms.compression.ring import RING_PURPOSE, quantize_into_ring

                seed = self._cfg.seed if self._cfg is not None else 0
                rng = numpy_rng(seed, RING_PURPOSE, round=r, client=cid)
                x = quantize_into_ring(vector, p.fixed_point(), rng)
            else:
                x = encode(vector, p.fixed_point())
        except FedloomError as exc:  # e.g. a weight over secagg.max_weight: report, as a failed training
            self.log("secagg_failed", level="warning", round=r, reason=str(exc))
            header = pb.UpdateHeader(round=r, broadcast_digest=task.broadcast_digest, failure=f"error: {exc}")
            raw.push(encode_chunk(b"", header), metadata=self._md, timeout=30)
            return
        try:
            keys, advert = sa.advertise_keys(p.round_params(), cid)
            roster = call(0, advert, meta)
            if roster is None:
                return
            sharing, shares = sa.share_keys(keys, decode_secagg(roster, Roster))
            inbox = call(1, shares)
            if inbox is None:
                return
            masked, y = sa.masked_input(sharing, decode_secagg(inbox, ShareInbox), x)
            request = call(2, y)
            if request is None:
                return
            if call(3, sa.unmask(masked, decode_secagg(request, UnmaskRequest))) is None:
                return
        except FedloomError as exc:  # e.g. a malformed server message
            self.log("secagg_failed", level="warning", round=r, reason=str(exc))
            return
        if self._states is not None:
            self._states.commit()  # took part in every stage (SecAgg tells no client who was summed)
        self.rounds_done.append(r)
        self.log("secagg_done", round=r, compute_s=round(compute, 4))


class _RawCalls:
    """GetTask and Push with their model payload left as encoded bytes (see ``fedloom.net.service.handlers``)."""

    _SERVICE = "/fedloom.net.v1.Coordinator/"
    _BROADCAST = pb.TaskReply.DESCRIPTOR.fields_by_name["broadcast"].number

    def __init__(self, channel: grpc.Channel) -> None:
        self._task = channel.unary_unary(
            self._SERVICE + "GetTask",
            request_serializer=pb.TaskRequest.SerializeToString,
            response_deserializer=_raw,
            _registered_method=True,
        )
        self.push = channel.unary_unary(
            self._SERVICE + "Push",
            request_serializer=_raw,
            response_deserializer=pb.UploadReply.FromString,
            _registered_method=True,
        )

    def task(self, request: pb.TaskRequest, **kw: Any) -> tuple[pb.TaskReply, memoryview | None]:
        """The task, and the broadcast blob when the reply carries it (sliced out once, not parsed)."""
        raw = self._task(request, **kw)
        try:
            rest, blob = split_bytes_field(raw, self._BROADCAST)
            return pb.TaskReply.FromString(rest), blob
        except (UpdateError, DecodeError) as exc:
            raise RunStateError(f"the server's task reply does not parse: {exc}") from None


def _raw(b: bytes) -> bytes:
    return b


def _details(exc: grpc.RpcError) -> str:
    details = exc.details() if hasattr(exc, "details") else None
    return str(details) if details else str(exc)


def fetch_status(
    server: str, tls: Credentials, token: str, *, timeout: float = 10.0, insecure: bool = False
) -> dict[str, Any]:
    """The server's operator view (the Status RPC) as a dict; raises :class:`FedloomError` if unreachable."""
    channel = make_channel(server, tls, 4 * 1024 * 1024, insecure=insecure)
    try:
        reply = pbg.CoordinatorStub(channel).Status(  # type: ignore[no-untyped-call]
            pb.StatusRequest(), metadata=(("fedloom-token", token),), timeout=timeout
        )
    except grpc.RpcError as exc:
        details = _details(exc)
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            details = explain_connect_failure(details, tls=tls.ca is not None)[0]
        raise FedloomError(f"status from {server} failed: {details}") from None
    finally:
        channel.close()
    info: dict[str, Any] = json.loads(reply.json)
    return info


def upload_chunks(round: int, digest: str, meta_json: str, blob: bytes, chunk: int) -> Iterator[pb.Chunk]:
    """The Upload stream: a header on the first chunk, then the blob in pieces."""
    header = pb.UpdateHeader(round=round, broadcast_digest=digest, total_bytes=len(blob), meta_json=meta_json)
    for i, piece in enumerate(iter_chunks(blob, chunk)):
        yield pb.Chunk(header=header, data=piece) if i == 0 else pb.Chunk(data=piece)
