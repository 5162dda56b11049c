"""The gRPC service: the RPC handlers and who may call them.

Every call names its client (``fedloom-client`` metadata) and, with a token book, proves it
(``fedloom-token``); under mutual TLS the client certificate's common name must be that
client. Refusals are answered alike (see :mod:`fedloom.net.refusals`) and recorded within a
rate. The handlers run as coroutines on the server's one event loop
(:mod:`fedloom.net.serving`) and share the :class:`~fedloom.net.coordinator.Coordinator`
with the round loop; they are short and non-blocking, except a SecAgg stage (it waits for
the stage to close), Status (it scans the audit log) and the validation of a streamed upload
(a model larger than one message), which go to a thread pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from fedloom.config.loader import config_to_toml
from fedloom.config.schema import ExperimentConfig
from fedloom.core.errors import UpdateError
from fedloom.net.auth import OPERATOR, AuthError, TokenBook
from fedloom.net.coordinator import Coordinator, Task
from fedloom.net.evaluation import SiteEvaluation
from fedloom.net.logs import JsonLog
from fedloom.net.proto import fedloom_pb2 as pb
from fedloom.net.proto import fedloom_pb2_grpc as pbg
from fedloom.net.refusals import REFUSED, RefusalGate, clip_name
from fedloom.net.state import NetState
from fedloom.net.wire import chunk_size_for, decode_chunk, encode_bytes_field, iter_chunks

__all__ = ["Service", "handlers"]

_TASK_BROADCAST_FIELD = pb.TaskReply.DESCRIPTOR.fields_by_name["broadcast"].number
# TaskReplies with the model kept per round: whole and patched, each at a few deadlines (in tenths)
_REPLIES_KEPT = 4


class Service:
    """The RPC handlers (see the module docstring)."""

    def __init__(
        self,
        coord: Coordinator,
        cfg: ExperimentConfig,
        tokens: TokenBook | None,
        mtls: bool,
        state: NetState,
        log: JsonLog,
        run_id: str,
        evals: SiteEvaluation | None = None,
    ) -> None:
        """``evals``: the evaluation desk the round engine opens phases on (``None``: one that no phase
        is ever opened on, so no client is asked to evaluate)."""
        self.coord, self.cfg, self.tokens, self.mtls = coord, cfg, tokens, mtls
        self.evals = evals if evals is not None else SiteEvaluation(coord.names, (), state, log)
        self.state, self.log, self.run_id = state, log, run_id
        self.chunk = chunk_size_for(cfg.deploy.max_message_bytes)
        self.refusals = RefusalGate()
        self._pieces_lock = threading.Lock()
        # The model's forms sent this round, by (broadcast digest, patch base digest or ""): the whole
        # broadcast and its patch, each cut into chunks, each as an encoded TaskReply field, and the
        # replies built from them (by TaskReply without the broadcast). Emptied when the model changes.
        self._cut: dict[tuple[str, str], list[bytes]] = {}
        self._whole: dict[tuple[str, str], bytes] = {}
        self._reply: dict[bytes, bytes] = {}
        # Set by the server once its loop runs: the long-polls' wake-up (see ``_tasks_changed``).
        self.loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        self._blocking = ThreadPoolExecutor(
            max_workers=len(coord.names) + 4, thread_name_prefix="fedloom-blocking"
        )
        coord.watch_tasks(self._tasks_changed)
        self.evals.watch_tasks(self._tasks_changed)

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
        self.evals.forget(cid)  # it may have test data now
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
        """An encoded ``TaskReply`` (raw bytes: see :func:`handlers`); TRAIN carries the broadcast if it fits.

        A long-poll: parked (a coroutine, no thread) until this client has a task or ``wait_s`` passes.
        """
        cid = await self._who(context)
        assert self.loop is not None
        end = self.loop.time() + max(0.0, min(request.wait_s, 30.0))
        held = request.held_digest
        while (t := self.evals.task_now(cid) or self.coord.task_now(cid, held)) is None:
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
        kind = {"wait": pb.WAIT, "train": pb.TRAIN, "done": pb.DONE, "evaluate": pb.EVALUATE}[t.kind]
        small: bytes = pb.TaskReply(
            kind=kind,
            round=t.round,
            broadcast_digest=t.digest,
            broadcast_bytes=t.size,
            broadcast_xxh3=t.xxh3,
            deadline_in_s=t.deadline_in_s,
            secagg_json=t.secagg_json,
            message=t.message,
            patch_base_digest=t.base,
        ).SerializeToString()
        if t.kind != "train":
            return small
        start = time.perf_counter()
        full = self._with_broadcast(small, t.round, t.digest, t.base)
        if full is None:
            return small  # the client streams it with Download
        self.coord.note_download(t.round, start, time.perf_counter(), t.size)
        return full

    def _with_broadcast(self, small: bytes, round: int, digest: str, base: str = "") -> bytes | None:
        """``small`` with ``TaskReply.broadcast`` set to the open round's blob, or its patch against
        the broadcast ``base`` (None: closed, or too big).

        Messages concatenate, so this is ``small + encode_bytes_field(...)``. The round's clients
        mostly get byte-identical replies (see ``Task.deadline_in_s``): the last few are kept, so a
        round copies the model (and its patch) once for its replies rather than once per client.
        """
        with self._pieces_lock:
            blob = self.coord.broadcast_blob(round, digest, base)
            if blob is None:
                return None
            key = (digest, base)
            field = self._whole.get(key)
            if field is None:
                if any(d != digest for d, _ in self._whole):
                    self._whole.clear()
                    self._reply.clear()
                field = self._whole[key] = encode_bytes_field(_TASK_BROADCAST_FIELD, blob)
            full = self._reply.get(small)
            if full is None:
                if len(small) + len(field) > self.cfg.deploy.max_message_bytes:
                    return None
                if len(self._reply) >= _REPLIES_KEPT:
                    del self._reply[next(iter(self._reply))]
                full = self._reply[small] = small + field
            return full

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
        pieces = self._pieces(request.round, request.broadcast_digest, request.patch_base_digest)
        if pieces is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"round {request.round} is not open")
            return
        for piece in pieces:
            yield pb.Chunk(data=piece)
        self.coord.note_download(request.round, start, time.perf_counter(), sum(len(p) for p in pieces))

    def _pieces(self, round: int, digest: str, base: str = "") -> list[bytes] | None:
        """The open round's broadcast (or its patch against ``base``) cut into chunks, cut once per
        round rather than per client."""
        key = (digest, base)
        with self._pieces_lock:
            pieces = self._cut.get(key)
            if pieces is None:
                blob = self._blob(round, digest, base)
                if blob is None:
                    return None
                if any(d != digest for d, _ in self._cut):
                    self._cut.clear()
                pieces = self._cut[key] = list(iter_chunks(blob, self.chunk))
            elif self._blob(round, digest, base) is None:
                return None  # the same model again, but that round closed
            return pieces

    def _blob(self, round: int, digest: str, base: str = "") -> bytes | None:
        """The open round's broadcast (or its patch against ``base``), or the model of an open
        evaluation phase, named ``digest``."""
        blob = self.coord.broadcast_blob(round, digest, base)
        return blob if blob is not None or base else self.evals.blob(round, digest)

    async def Evaluate(
        self, request: pb.EvalReport, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.UploadReply:
        """A site's evaluation report (see :mod:`fedloom.net.evaluation`)."""
        cid = await self._who(context)
        error = self.evals.receive(cid, request)
        return pb.UploadReply(accepted=error is None, error=error or "")

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
        """One update in one encoded ``Chunk`` (raw bytes: see :func:`handlers`).

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


class _Capture:
    """Stands in for a server to catch the generated method handlers (see :func:`handlers`)."""

    def __init__(self) -> None:
        self.name, self.handlers = "", dict[str, Any]()

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, name: str, handlers: dict[str, Any]) -> None:
        self.name, self.handlers = name, dict(handlers)


def handlers(service: Service) -> tuple[str, dict[str, Any]]:
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
