"""The deployed server: the gRPC service (thin) and the round loop (the simulation runner's twin).

The round loop mirrors :func:`fedloom.sim.runner.run_simulation`: cohorts from
``sample_clients(seed, round, population, size)`` over the ordered registry
``deploy.clients`` (under DP from :func:`~fedloom.sim.sampling.secret_sample` with a
secret the server generates at run start, keeps in its state database and never
sends, so that no client can predict a cohort), updates through ``pipeline.decode`` (at upload time, in the
coordinator), ``algorithm.aggregate`` over the accepted updates sorted by client
id, ``pipeline.server``, ``algorithm.server_update``, evaluation, and one
``RunStore.commit_round`` per round.

Resume: a server started on a state directory that holds a run continues it
from its last checkpoint, with the same cohort for the interrupted round and the
updates that round had already accepted (the pending updates, see :mod:`fedloom.net.state`). Because cohorts
depend only on (seed, round), aggregation order only on client ids, and clients
train deterministically from (seed, round, client), a run killed and resumed
ends with the same model, bit for bit, as an uninterrupted one -- provided every
selected client answers within the deadline (the quorum/deadline outcome of a
round that closes on time is inherently timing dependent). A server stopped by an error (a
round below quorum, a full disk) answers its clients WAIT with the reason (``TaskReply.message``),
never DONE, so they keep reconnecting and a restarted server resumes the run with them.

A round's server step runs through :func:`fedloom.net.guard.guarded_apply`: an update
that makes the new model unusable (non-finite, or overflowing float32), or makes the step
raise, is left out and rejected; when no model comes out, the attempt is aborted and its
updates dropped, so only usable models are ever committed and resumed from.

Secure aggregation (``secagg.enabled``): a round is run through a
:class:`~fedloom.net.secure.SecureRelay` -- clients upload no update, the server
relays the four SecAgg stages (the ``SecAgg`` RPC) and turns the unmasked sum
into the aggregate (``aggregate_from_sum``); see :mod:`fedloom.net.secure`.

Threads: the gRPC service runs on one ``grpc.aio`` event loop in a thread of its own
(:class:`_AsyncServer`), the round loop on the caller's thread; they share the
:class:`~fedloom.net.coordinator.Coordinator`. Blocking work (a SecAgg stage, Status,
a streamed upload) goes to a small thread pool. A finished round is committed (checkpoint,
pending updates released, metrics line) on a thread of its own once the next round is open
(:class:`_Committer`); a server killed before that commit redoes the round from its pending
updates.

Each ``round_committed`` log line carries ``phases``: where the round's wall time went
(see :mod:`fedloom.net.timing`), so the overhead benchmark can be explained.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from fedloom.algorithms.api import Broadcast, ServerContext, ServerState, Workspace
from fedloom.algorithms.requirements import requirements_of
from fedloom.config.loader import config_differences, config_to_toml
from fedloom.config.schema import ExperimentConfig
from fedloom.core.errors import ConfigError, FedloomError, RunStateError, TrainingError, UpdateError
from fedloom.core.rng import numpy_rng
from fedloom.core.serde import params_to_bytes
from fedloom.data.datasets import ArrayDataset
from fedloom.net.auth import OPERATOR, AuthError, Credentials, TokenBook
from fedloom.net.coordinator import Closed, Coordinator, Task
from fedloom.net.guard import Guarded, guarded_apply
from fedloom.net.logs import JsonLog
from fedloom.net.proto import fedloom_pb2 as pb
from fedloom.net.proto import fedloom_pb2_grpc as pbg
from fedloom.net.refusals import REFUSED, RefusalGate, clip_name
from fedloom.net.state import NetState
from fedloom.net.transport import check_plaintext
from fedloom.net.wire import (
    chunk_size_for,
    decode_chunk,
    encode_broadcast,
    encode_bytes_field,
    iter_chunks,
    model_digest,
)
from fedloom.results.store import RunStore, orphan_artefacts
from fedloom.sim.build import build_algorithm, build_pipeline, task_for
from fedloom.sim.evaluate import evaluate
from fedloom.sim.privacy_plan import plan_privacy
from fedloom.sim.sampling import cohort_size, sample_clients, secret_sample
from fedloom.tasks.task import task_workspace

_TASK_BROADCAST_FIELD = pb.TaskReply.DESCRIPTOR.fields_by_name["broadcast"].number

if TYPE_CHECKING:  # fedloom.net.secure needs the optional 'secure' extra
    from fedloom.net.secure import SecureRelay

__all__ = ["ServerOptions", "client_names", "run_server"]

STATE_DB = "state.sqlite"
METRICS = "metrics.jsonl"
MODEL = "model.safetensors"
ENDPOINT = "endpoint"
# meta key of the run's cohort secret (hex): generated at run start, kept in the state db, never sent
COHORT_SECRET = "cohort_secret"


def client_names(cfg: ExperimentConfig) -> list[str]:
    """The ordered registry of expected clients (a client's id is its index)."""
    return list(cfg.deploy.clients) or [str(i) for i in range(cfg.data.num_clients)]


@dataclass(frozen=True)
class ServerOptions:
    listen: str = "127.0.0.1:8470"
    tls: Credentials = field(default_factory=Credentials)
    tokens: Path | None = None
    eval_data: ArrayDataset | None = None
    linger_s: float = 10.0
    # Plaintext on a non-loopback ``listen`` (see fedloom.net.transport); logged as a warning.
    insecure: bool = False
    # Directories to import the experiment's task module from (the experiment file's folder).
    search: tuple[Path, ...] = ()


class _Service:
    """The RPC handlers. They run as coroutines on the server's one event-loop thread (see
    :class:`_AsyncServer`); everything they call is short and non-blocking, except a SecAgg stage
    (it waits for the stage to close), Status (it scans the audit log) and the validation of a
    streamed upload (a model larger than one message), which go to a thread pool."""

    def __init__(
        self,
        coord: Coordinator,
        cfg: ExperimentConfig,
        tokens: TokenBook | None,
        mtls: bool,
        state: NetState,
        log: JsonLog,
        run_id: str,
    ) -> None:
        self.coord, self.cfg, self.tokens, self.mtls = coord, cfg, tokens, mtls
        self.state, self.log, self.run_id = state, log, run_id
        self.chunk = chunk_size_for(cfg.deploy.max_message_bytes)
        self.refusals = RefusalGate()
        self._pieces_lock = threading.Lock()
        self._cut: tuple[str, list[bytes]] = ("", [])
        self._whole: tuple[str, bytes] = ("", b"")
        self._reply: tuple[bytes, bytes] = (b"", b"")  # (TaskReply without broadcast, with it)
        # Set by the server once its loop runs: the long-polls' wake-up (see ``_tasks_changed``).
        self.loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        self._blocking = ThreadPoolExecutor(
            max_workers=len(coord.names) + 4, thread_name_prefix="fedloom-blocking"
        )
        coord.watch_tasks(self._tasks_changed)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self._changed = loop, asyncio.Event()

    def _tasks_changed(self) -> None:
        """From any thread: wake every parked GetTask (they each re-check their own task)."""
        if self.loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is parked any more
                self.loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        if self._changed is not None:
            event, self._changed = self._changed, asyncio.Event()
            event.set()

    def close(self) -> None:
        self._blocking.shutdown(wait=False, cancel_futures=True)

    # ---- authentication ------------------------------------------------
    async def _who(self, context: grpc.aio.ServicerContext[Any, Any], *, operator: bool = False) -> int:
        md = {k: v for k, v in context.invocation_metadata() or ()}
        name = str(md.get("fedloom-client", ""))
        token = str(md.get("fedloom-token", ""))
        try:
            if self.mtls and not operator:
                cns = [c.decode() for c in context.auth_context().get("x509_common_name", [])]
                if name not in cns:
                    raise AuthError(f"client certificate is for {cns}, not for {name!r}")
            if self.tokens is not None:
                self.tokens.check(OPERATOR if operator else name, token)
            if operator:
                return -1
            cid = self.coord.client_id(name)
            if cid is None:
                raise AuthError(f"unknown client {name!r}: not in deploy.clients")
        except AuthError as exc:
            self._refused(name, context.peer(), str(exc))
            # One answer for every refusal (see fedloom.net.refusals), except to a revoked client
            # that proved its identity with its own token.
            public = str(exc) if exc.public else REFUSED
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, public)
            raise  # unreachable: abort raises
        self.coord.touch(cid)
        return cid

    def _refused(self, name: str, peer: str, reason: str) -> None:
        """Record a refusal, within the gate's rate, with what the caller claimed cut short."""
        suppressed = self.refusals.admit()
        if suppressed is None:
            return
        name, reason = clip_name(name), clip_name(reason, 300)
        if suppressed:
            reason += f" (+{suppressed} refused calls not recorded before this one)"
        self.log("refused", level="warning", client=name, peer=clip_name(peer), reason=reason)
        self.state.audit(self.coord.completed_round + 1, -1, name, "refused", 0, reason)

    # ---- RPCs ----------------------------------------------------------
    async def Join(
        self, request: pb.JoinRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.JoinReply:
        cid = await self._who(context)
        name = self.coord.names[cid]
        self.state.record_join(cid, name)
        self.log("join", client=name, id=cid, peer=context.peer())
        unsettled = request.unsettled_round
        return pb.JoinReply(
            unsettled_accepted=unsettled > 0 and self.state.was_accepted(unsettled, cid),
            client_id=cid,
            config_toml=config_to_toml(self.cfg),
            run_id=self.run_id,
            max_message_bytes=self.cfg.deploy.max_message_bytes,
            heartbeat_s=self.cfg.deploy.heartbeat_s,
            population=len(self.coord.names),
        )

    async def GetTask(self, request: pb.TaskRequest, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        """An encoded ``TaskReply`` (raw bytes: see :func:`_handlers`); TRAIN carries the broadcast if it fits.

        A long-poll: parked (a coroutine, no thread) until this client has a task or ``wait_s`` passes.
        """
        cid = await self._who(context)
        assert self.loop is not None
        end = self.loop.time() + max(0.0, min(request.wait_s, 30.0))
        while (t := self.coord.task_now(cid)) is None:
            left = end - self.loop.time()
            if left <= 0:
                t = Task("wait")
                break
            # Taken before the next await: a change after task_now() sets this very event.
            changed = self._changed
            assert changed is not None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):  # unlike wait_for, no task per wait
                    await changed.wait()
        kind = {"wait": pb.WAIT, "train": pb.TRAIN, "done": pb.DONE}[t.kind]
        small: bytes = pb.TaskReply(
            kind=kind,
            round=t.round,
            broadcast_digest=t.digest,
            broadcast_bytes=t.size,
            broadcast_xxh3=t.xxh3,
            deadline_in_s=t.deadline_in_s,
            secagg_json=t.secagg_json,
            message=t.message,
        ).SerializeToString()
        if t.kind != "train":
            return small
        start = time.perf_counter()
        full = self._with_broadcast(small, t.round, t.digest)
        if full is None:
            return small  # the client streams it with Download
        self.coord.note_download(t.round, start, time.perf_counter())
        return full

    def _with_broadcast(self, small: bytes, round: int, digest: str) -> bytes | None:
        """``small`` with ``TaskReply.broadcast`` set to the open round's blob (None: closed, or too big).

        Messages concatenate, so this is ``small + encode_bytes_field(...)``. The round's clients
        mostly get byte-identical replies (see ``Task.deadline_in_s``): the last one is kept, so a
        round copies the model once for its replies rather than once per client.
        """
        with self._pieces_lock:
            blob = self.coord.broadcast_blob(round, digest)
            if blob is None:
                return None
            if self._whole[0] != digest:
                self._whole = (digest, encode_bytes_field(_TASK_BROADCAST_FIELD, blob))
                self._reply = (b"", b"")
            if self._reply[0] != small:
                field = self._whole[1]
                if len(small) + len(field) > self.cfg.deploy.max_message_bytes:
                    return None
                self._reply = (small, small + field)
            return self._reply[1]

    async def SecAgg(
        self, request: pb.SecAggRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.SecAggReply:
        cid = await self._who(context)
        assert self.loop is not None
        # The exchange blocks until the stage closes (all selected clients, or the deadline).
        reply, error = await self.loop.run_in_executor(
            self._blocking,
            self.coord.secure_exchange,
            cid,
            request.round,
            request.stage,
            request.payload,
            request.meta_json,
            request.session,
        )
        return pb.SecAggReply(payload=reply, error=error)

    async def Download(
        self, request: pb.DownloadRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.Chunk]:
        await self._who(context)
        start = time.perf_counter()
        pieces = self._pieces(request.round, request.broadcast_digest)
        if pieces is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"round {request.round} is not open")
            return
        for piece in pieces:
            yield pb.Chunk(data=piece)
        self.coord.note_download(request.round, start, time.perf_counter())

    def _pieces(self, round: int, digest: str) -> list[bytes] | None:
        """The open round's broadcast cut into chunks, cut once per round rather than per client."""
        with self._pieces_lock:
            if self._cut[0] != digest:
                blob = self.coord.broadcast_blob(round, digest)
                if blob is None:
                    return None
                self._cut = (digest, list(iter_chunks(blob, self.chunk)))
            elif self.coord.broadcast_blob(round, digest) is None:
                return None  # the same model again, but that round closed
            return self._cut[1]

    async def Upload(
        self, request_iterator: AsyncIterator[pb.Chunk], context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.UploadReply:
        cid = await self._who(context)
        header: pb.UpdateHeader | None = None
        pieces: list[bytes | memoryview] = []
        size, limit, start = 0, 0, 0.0
        async for chunk in request_iterator:
            if not pieces:  # the first chunk: its header decides whether the rest is read at all
                header = chunk.header if chunk.HasField("header") else None
                refused, limit = self._admit(cid, header, len(chunk.data))
                if refused is not None:
                    return refused
                start = time.perf_counter()
            pieces.append(chunk.data)
            size += len(chunk.data)
            if size > limit:
                reason = f"update stream passed the limit of {limit} bytes"
                assert header is not None
                return pb.UploadReply(
                    accepted=False, error=self.coord.reject(cid, header.round, size, reason)
                )
        if not pieces or header is None:
            return pb.UploadReply(accepted=False, error=self.coord.reject(cid, 0, 0, "empty upload"))
        # Larger than one message: validating it on the loop would stall every other call for as
        # long as that takes (about a millisecond per MB), so a worker thread does it.
        assert self.loop is not None
        return await self.loop.run_in_executor(
            self._blocking, self._receive, cid, header, pieces, size, start
        )

    async def Push(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> pb.UploadReply:
        """One update in one encoded ``Chunk`` (raw bytes: see :func:`_handlers`).

        Validated and stored right here, on the event loop: handing it to a worker thread cost
        more (GIL hand-offs) than the loop loses by waiting the ~0.5 ms it takes.
        """
        cid = await self._who(context)
        try:
            header, data = decode_chunk(request)
        except UpdateError as exc:
            return pb.UploadReply(accepted=False, error=self.coord.reject(cid, 0, len(request), str(exc)))
        refused, limit = self._admit(cid, header, len(data))
        if refused is not None:
            return refused
        assert header is not None
        if len(data) > limit:
            reason = f"update stream passed the limit of {limit} bytes"
            return pb.UploadReply(
                accepted=False, error=self.coord.reject(cid, header.round, len(data), reason)
            )
        return self._receive(cid, header, [data], len(data), time.perf_counter())

    def _admit(self, cid: int, h: pb.UpdateHeader | None, nbytes: int) -> tuple[pb.UploadReply | None, int]:
        """Checks on an upload's header before its blob is read: (the refusal, or None; the byte limit).

        A failure report (``h.failure``) is handled here and answered at once.
        """
        if h is None:
            reason = self.coord.reject(cid, 0, nbytes, "upload without a header")
            return pb.UploadReply(accepted=False, error=reason), 0
        if h.failure:
            err = self.coord.report_failure(cid, h.round, h.failure)
            return pb.UploadReply(accepted=err is None, error=err or ""), 0
        if self.coord.refuses_plaintext():
            reason = "secure aggregation is on: plaintext updates are refused"
            return pb.UploadReply(accepted=False, error=self.coord.reject(cid, h.round, 0, reason)), 0
        limit = self.coord.upload_limit(self.cfg.deploy.max_update_bytes)
        if h.total_bytes > limit:
            reason = f"update of {h.total_bytes} bytes exceeds the limit of {limit} bytes"
            return pb.UploadReply(
                accepted=False, error=self.coord.reject(cid, h.round, h.total_bytes, reason)
            ), 0
        return None, limit

    def _receive(
        self, cid: int, h: pb.UpdateHeader, pieces: list[bytes | memoryview], size: int, start: float
    ) -> pb.UploadReply:
        """The whole update from ``cid`` has arrived (``pieces``, ``size`` bytes): check and submit it."""
        if size != h.total_bytes:
            reason = f"update announced {h.total_bytes} bytes but {size} arrived"
            return pb.UploadReply(accepted=False, error=self.coord.reject(cid, h.round, size, reason))
        blob = pieces[0] if len(pieces) == 1 else b"".join(pieces)  # one chunk: no copy at all
        received = time.perf_counter() - start
        err = self.coord.submit(cid, h.round, h.broadcast_digest, h.meta_json, blob, received_s=received)
        return pb.UploadReply(accepted=err is None, error=err or "")

    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.HeartbeatReply:
        await self._who(context)
        return pb.HeartbeatReply(round=self.coord.completed_round)

    async def Status(
        self, request: pb.StatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.StatusReply:
        await self._who(context, operator=True)
        assert self.loop is not None
        counts = await self.loop.run_in_executor(
            self._blocking, self.state.event_counts
        )  # scans the audit log
        refused = {"total": self.refusals.total, "unrecorded": self.refusals.suppressed}
        info = self.coord.status({"run_id": self.run_id, "audit": counts, "refused": refused})
        return pb.StatusReply(json=json.dumps(info))


class _AsyncServer:
    """The gRPC server on ``grpc.aio``: one event loop, on a thread of its own, serves every call.

    The round loop keeps the main thread. Measured against one handler thread per call
    (``benchmarks/bench_net.py``, 20 clients on 2 cores, five alternating pairs of 40-round
    runs, 2026-12-02): server CPU per round 40.0 against 47.6 ms, overhead 52.0 against 54.8 ms,
    lower in every pair. ``perf`` had put about a third of the threaded server's CPU in the
    kernel's context switches, half of them threads waiting to take the GIL back.
    """

    def __init__(self, service: _Service, cfg: ExperimentConfig, options: ServerOptions) -> None:
        self.service, self.cfg, self.options = service, cfg, options
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="fedloom-grpc", daemon=True)
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self._grace = 1.0
        self.port = 0
        self._error: BaseException | None = None

    def start(self) -> int:
        """Serve in the background; returns the bound port (raises if it cannot listen)."""
        self._thread.start()
        self._started.wait(timeout=60)
        if self._error is not None:
            raise self._error
        if not self._started.is_set():
            raise RunStateError("the gRPC server did not start within 60 s")
        return self.port

    def stop(self, grace: float) -> None:
        """Stop serving (calls in flight get ``grace`` seconds) and wait for the loop to end."""
        self._grace = grace
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=grace + 30)
        self.service.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported by start() when it happens before serving
            self._error = exc
            self._started.set()
        finally:
            self.loop.close()

    async def _serve(self) -> None:
        limit = self.cfg.deploy.max_message_bytes
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
            ],
        )
        name, handlers = _handlers(self.service)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
        server.add_registered_method_handlers(name, handlers)
        ca, cert, key = self.options.tls.read()
        if cert is not None and key is not None:
            creds = grpc.ssl_server_credentials(
                [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
            )
            port = server.add_secure_port(self.options.listen, creds)
        else:
            check_plaintext(self.options.listen, insecure=self.options.insecure, role="server --listen")
            port = server.add_insecure_port(self.options.listen)
        if port == 0:
            raise RunStateError(f"cannot listen on {self.options.listen} (address in use or invalid)")
        self.service.bind(self.loop)
        self._stop = asyncio.Event()
        await server.start()
        self.port = port
        self._started.set()
        await self._stop.wait()
        await server.stop(self._grace)


class _Capture:
    """Stands in for a server to catch the generated method handlers (see :func:`_handlers`)."""

    def __init__(self) -> None:
        self.name, self.handlers = "", dict[str, Any]()

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, name: str, handlers: dict[str, Any]) -> None:
        self.name, self.handlers = name, dict(handlers)


def _handlers(service: _Service) -> tuple[str, dict[str, Any]]:
    """The generated handlers (service name, method -> handler), except that GetTask replies and
    Push requests stay raw bytes.

    Those two carry a whole model in one message; :func:`~fedloom.net.wire.encode_bytes_field`
    and :func:`~fedloom.net.wire.decode_chunk` do the (byte-identical) protobuf encoding with
    one copy of the payload, where protobuf's own encoder copies it twice.
    """
    cap = _Capture()
    pbg.add_CoordinatorServicer_to_server(service, cap)  # type: ignore[no-untyped-call]
    cap.handlers["GetTask"] = grpc.unary_unary_rpc_method_handler(
        service.GetTask, request_deserializer=pb.TaskRequest.FromString, response_serializer=_raw
    )
    cap.handlers["Push"] = grpc.unary_unary_rpc_method_handler(
        service.Push, request_deserializer=_raw, response_serializer=pb.UploadReply.SerializeToString
    )
    return cap.name, cap.handlers


def _raw(b: bytes) -> bytes:
    return b


def run_server(cfg: ExperimentConfig, state_dir: Path, options: ServerOptions, log: JsonLog) -> ServerState:
    """Serve the experiment until its round budget (or target accuracy) is reached; resumable.

    Without TLS (``options.tls.cert``) ``options.listen`` must be a loopback address unless
    ``options.insecure`` (:class:`~fedloom.net.transport.InsecureTransportError` otherwise).
    """
    if (options.tls.cert is None or options.tls.key is None) and check_plaintext(
        options.listen, insecure=options.insecure, role="server --listen"
    ):
        log("plaintext", level="warning", listen=options.listen, reason="insecure=True: no TLS")
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
    state_dir.mkdir(parents=True, exist_ok=True)
    db = state_dir / STATE_DB
    toml = config_to_toml(cfg)
    orphans = orphan_artefacts(state_dir, db)
    if orphans:
        raise RunStateError(
            f"{state_dir} holds run artefacts ({', '.join(orphans)}) but {db} holds no run (missing, "
            "empty, or copied without its -wal file); restore the database, or use another --state-dir"
        )
    with RunStore(db, create=True) as store, NetState(db) as net:
        if store.latest_round() >= 0:
            changed = config_differences(store.get_meta("config") or "", toml)
            if changed:
                raise RunStateError(
                    f"{state_dir} holds a run with a different configuration (differs in "
                    f"{', '.join(changed)}); use another --state-dir"
                )
            state = store.load_state()
            run_id = store.get_meta("run_id") or ""
            secret = store.get_meta(COHORT_SECRET) or ""  # absent in runs of older versions: seed cohorts
            log("resume", round=state.round, state_dir=str(state_dir))
        else:
            run_id = hashlib.sha256(f"{toml}{time.time()}".encode()).hexdigest()[:16]
            store.set_meta("config", toml)
            store.set_meta("run_id", run_id)
            secret = secrets.token_hex(32)
            store.set_meta(COHORT_SECRET, secret)
            state = algorithm.server_init(initial)
            store.commit_round(state, {"round": 0}, {}, keep=cfg.checkpoint.keep)
        history = [m for m in store.metrics(up_to=state.round) if m.get("round", 0) > 0]
        store.set_meta("status", "running")
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
        if history:
            coord.finish(history[-1])
        tokens = TokenBook(options.tokens) if options.tokens is not None else None
        mtls = options.tls.ca is not None and options.tls.cert is not None
        service = _Service(coord, cfg, tokens, mtls, net, log, run_id)
        server = _AsyncServer(service, cfg, options)
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
            round=state.round,
        )
        try:
            with _Committer() as committer:
                state = _loop(
                    cfg,
                    state,
                    store,
                    net,
                    coord,
                    algorithm,
                    pipeline,
                    workspace,
                    options,
                    log,
                    selected_n,
                    size,
                    history,
                    committer,
                    bytes.fromhex(secret),
                )
            (state_dir / MODEL).write_bytes(params_to_bytes(state.params))
            store.set_meta("status", "completed")
            net.drop_free_slots()
            coord.set_done()
            log("done", round=state.round, metrics=coord.last_metrics)
            end = time.monotonic() + options.linger_s
            while time.monotonic() < end and not coord.everyone_told_done():
                time.sleep(0.1)
        except FedloomError as exc:
            store.set_meta("status", "failed")
            store.set_meta("error", str(exc))
            # Not "done": the run resumes when the server is restarted, so the clients keep
            # reconnecting (until their --give-up-after) rather than exit.
            coord.set_stopping(f"the server stopped: {exc}")
            log("failed", level="error", error=str(exc))
            time.sleep(min(options.linger_s, 2.0))
            raise
        finally:
            server.stop(grace=1.0)
    return state


def _loop(
    cfg: ExperimentConfig,
    state: ServerState,
    store: RunStore,
    net: NetState,
    coord: Coordinator,
    algorithm: Any,
    pipeline: Any,
    workspace: Workspace,
    options: ServerOptions,
    log: JsonLog,
    selected_n: int,
    size: int,
    history: list[dict[str, Any]],
    committer: _Committer,
    secret: bytes,
) -> ServerState:
    d = cfg.deploy
    population = len(coord.names)
    metrics_path = store.path.parent / METRICS
    metrics_path.write_text("".join(json.dumps(m) + "\n" for m in history), encoding="utf-8")
    if _reached(cfg, history[-1] if history else {}):
        return state
    privacy = plan_privacy(cfg, population=population, deployed=True)
    cpu_mark: float | None = None
    while state.round < cfg.rounds:
        r = state.round + 1
        if privacy is not None and privacy.would_exceed(r):
            log("privacy_budget_reached", round=r, epsilon=privacy.epsilon_after(state.round))
            break
        ctx = ServerContext(seed=cfg.seed, round=r, population=population)
        cohort = net.cohort(r)  # a round resumed after a restart keeps its selection
        t_encode = time.perf_counter()
        broadcast = algorithm.broadcast(state)
        blob = encode_broadcast(broadcast, cfg.compression.downlink)
        digest = model_digest(blob)
        encode_s = time.perf_counter() - t_encode
        for attempt in range(1, d.max_round_attempts + 1):
            _wait_for_clients(coord, d.min_quorum, d.wait_for_clients_s, r, log, committer)
            if cohort is None or (attempt > 1 and d.select_online):  # an aborted attempt: draw again
                online = coord.online() if d.select_online else None
                cohort = _draw_cohort(cfg, r, population, selected_n, online, secret if privacy else b"")
                net.record_cohort(r, cohort)
            lost = net.lost_pending(r)
            if lost:  # only after an OS crash or power loss (see fedloom.net.state)
                # Their rows go, so that the clients, still selected, are asked again and re-upload.
                net.drop_lost_pending(r, lost)
                log("pending_lost", level="warning", round=r, clients=[coord.names[c] for c in lost])
            t0, cpu0 = time.perf_counter(), time.process_time()
            relay = _secure_relay(cfg, cohort, min(size, len(cohort)), broadcast, r)
            coord.open_round(
                broadcast,
                blob,
                digest,
                attempt=attempt,
                selected=cohort,
                target=min(size, len(cohort)),
                deadline_s=d.deadline_s,
                ctx=ctx,
                pending=net.pending(r) if relay is None else (),
                algo_state=state.algo_state,
                relay=relay,
            )
            committer.flush()  # the previous round's commit, now that this round is open
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
            t_agg = time.perf_counter()
            unusable = ""
            if contributors >= d.min_quorum:
                guarded, closed = _aggregate(cfg, algorithm, pipeline, state, closed, broadcast, ctx)
                for c, why in sorted(guarded.blamed.items()):  # left out: not restored by the next attempt
                    net.drop_pending(r, c)
                    coord.reject(c, r, 0, why)
                contributors -= len(guarded.blamed)
                if guarded.state is not None and contributors >= d.min_quorum:
                    new_state = guarded.state
                    break
                unusable = guarded.reason
            reason = (
                f"round {r} attempt {attempt}: {contributors} accepted updates, below "
                f"deploy.min_quorum = {d.min_quorum}{secure_error}"
            )
            if unusable:
                reason = f"round {r} attempt {attempt}: no usable model: {unusable}"
            net.audit(r, -1, "", "round_aborted", 0, reason)
            log(
                "round_aborted",
                level="warning",
                round=r,
                attempt=attempt,
                reason=reason,
                dropouts=[coord.names[c] for c in closed.dropouts],
            )
        else:
            raise TrainingError(
                f"round {r} aborted {d.max_round_attempts} times (below quorum or no usable model); the last good checkpoint "
                f"(round {state.round}) is intact in {store.path}; restart the server to retry"
            )
        aggregate_s = time.perf_counter() - t_agg
        state = new_state
        # (client, examples, train loss): under SecAgg from the metadata sent in the clear at stage 0
        contributed = (
            [(c, m.num_examples, m.metrics.get("train_loss", 0.0)) for c, m in closed.secure.metas.items()]
            if closed.secure is not None
            else [(u.client_id, u.num_examples, u.metrics.get("train_loss", 0.0)) for u in closed.updates]
        )
        ex = sum(n for _, n, _ in contributed)
        metrics: dict[str, Any] = {
            "round": r,
            "train_loss": sum(n * loss for _, n, loss in contributed) / max(ex, 1),
            "num_clients": len(contributed),
            "num_failed": len(closed.failed),
            "num_dropouts": len(closed.dropouts),
            "num_examples": ex,
            "attempt": attempt,
        }
        if privacy is not None:
            metrics["epsilon"] = privacy.epsilon_after(r)
            metrics["dp_amplification"] = privacy.amplification
            if not privacy.amplification:
                metrics["dp_amplification_reason"] = privacy.no_amplification
        t_eval = time.perf_counter()
        if options.eval_data is not None and (r % cfg.eval.every == 0 or r == cfg.rounds):
            ev = evaluate(workspace, state.params, options.eval_data, batch_size=cfg.eval.batch_size)
            metrics["test_loss"] = ev.loss
            metrics.update({f"test_{k}": v for k, v in ev.metrics.items()})
        eval_s = time.perf_counter() - t_eval
        metrics["seconds"] = time.perf_counter() - t0
        metrics["max_client_compute_s"] = max(closed.compute_s.values(), default=0.0)
        if closed.secure is not None:
            metrics["secagg_error_bound"] = closed.secure.error_bound
        # The round is final in memory: its checkpoint is written on the committer thread while the
        # next round runs (see _Committer).
        phases = {
            "encode_broadcast_ms": round(1000 * encode_s, 2),
            **closed.timing,
            "aggregate_ms": round(1000 * aggregate_s, 2),
            "evaluate_ms": round(1000 * eval_s, 2),
            # when the round opened (perf_counter seconds): open to open is the time a round takes
            "opened_at_s": round(t0, 6),
            # open -> aggregated, evaluated and handed to the committer (the next round may open)
            "round_wall_ms": round(1000 * (time.perf_counter() - t0), 2),
        }
        cpu_now = time.process_time()
        # CPU seconds of the whole server process, all threads, since the previous round's handoff
        phases["server_cpu_ms"] = round(1000 * (cpu_now - (cpu0 if cpu_mark is None else cpu_mark)), 2)
        cpu_mark = cpu_now
        clients = sorted(c for c, _, _ in contributed)
        committer.defer(
            functools.partial(
                _commit,
                store,
                net,
                coord,
                log,
                metrics_path,
                state,
                metrics,
                clients,
                phases,
                cfg.checkpoint.keep,
            )
        )
        if _reached(cfg, metrics):
            committer.flush()
            committer.wait()
            log("target_reached", round=r)
            break
    return state


def _aggregate(
    cfg: ExperimentConfig,
    algorithm: Any,
    pipeline: Any,
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


class _Committer:
    """Commits a finished round on a thread of its own while the next round runs.

    A round's checkpoint costs the round loop two fsyncs (the checkpoint file, the database's
    commit) and its pending updates' clean-up: done in line they were a serial tail during which
    every client sat idle. Nothing of the next round depends on them: its broadcast is the state in
    memory, and a server killed before round ``r``'s commit resumes from round ``r - 1``'s
    checkpoint with round ``r``'s pending updates, still on disk (they are cleared only after the
    commit), so it recomputes the same state. One commit is in flight at a time, in round order.

    A commit handed over (:meth:`defer`) starts at the next :meth:`flush`, which the round loop calls
    once the next round is open: started at once, its Python (the checkpoint's encoding, SQLite)
    competed for the GIL with the serial step between the rounds (sampling, encoding and opening).
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedloom-commit")
        self._last: Future[None] | None = None
        self._deferred: Callable[[float], None] | None = None

    def wait(self) -> float:
        """Block until the last started commit is done (raising its error); returns the seconds waited."""
        start = time.perf_counter()
        last, self._last = self._last, None
        if last is not None:
            last.result()
        return time.perf_counter() - start

    def defer(self, job: Callable[[float], None]) -> None:
        """Hand over a commit, started by the next :meth:`flush`; ``job`` gets the seconds the commit
        before it made it wait."""
        self.flush()
        self._deferred = job

    def flush(self) -> None:
        """Start the commit handed over, once the one before it is done."""
        job, self._deferred = self._deferred, None
        if job is not None:
            waited = self.wait()
            self._last = self._pool.submit(job, waited)

    def __enter__(self) -> _Committer:
        return self

    def __exit__(self, *exc: object) -> None:
        """Commit what was handed over, whatever ended the loop (a round's data is never half-written)."""
        try:
            self.flush()
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def _commit(
    store: RunStore,
    net: NetState,
    coord: Coordinator,
    log: JsonLog,
    metrics_path: Path,
    state: ServerState,
    metrics: dict[str, Any],
    clients: list[int],
    phases: dict[str, float],
    keep: int,
    waited_s: float,
) -> None:
    """Make round ``state.round`` durable, then release its pending updates and report it.

    ``waited_s``: how long this commit waited for the one before it.
    """
    r = state.round
    phases["commit_wait_ms"] = round(1000 * waited_s, 2)
    start = time.perf_counter()
    store.commit_round(state, metrics, {}, keep=keep)
    phases["checkpoint_ms"] = round(1000 * (time.perf_counter() - start), 2)
    net.clear_pending(r)
    net.audit(r, -1, "", "round_committed", 0, json.dumps({"clients": clients}))
    with metrics_path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(metrics) + "\n")
    coord.finish(metrics)
    log("round_committed", **metrics, phases=phases)


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


def _secure_relay(
    cfg: ExperimentConfig, cohort: list[int], target: int, broadcast: Broadcast, r: int
) -> SecureRelay | None:
    """A fresh :class:`~fedloom.net.secure.SecureRelay` for this attempt, or ``None`` without SecAgg."""
    sa = cfg.secagg
    if not sa.enabled:
        return None
    from fedloom.core.rng import numpy_rng
    from fedloom.net.secure import SecureParams, SecureRelay, cohort_graph

    graph = cohort_graph(sa.graph, cohort, sa.degree, numpy_rng(cfg.seed, "secagg-graph", round=r))
    params = SecureParams.fresh(
        graph,
        threshold=sa.threshold,
        bits=sa.bits,
        length=broadcast.params.num_elements() + 1,
        clip=max(1.0, cfg.transforms.clip_norm),
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


def _draw_cohort(
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


def _reached(cfg: ExperimentConfig, metrics: Mapping[str, Any]) -> bool:
    target = cfg.eval.target_accuracy
    acc = metrics.get("test_accuracy")
    return target > 0 and acc is not None and float(acc) >= target


def _wait_for_clients(
    coord: Coordinator, quorum: int, limit_s: float, r: int, log: JsonLog, committer: _Committer
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
