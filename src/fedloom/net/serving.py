"""The server's lifecycle on ``grpc.aio``: one event loop, on a thread of its own, serves every call.

The round loop keeps the caller's thread. Measured against one handler thread per call
(``benchmarks/bench_net.py``, 20 clients on 2 cores): less server CPU per round and less
overhead, because a threaded server spent much of its CPU in context switches, threads
waiting to take the GIL back.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from fedloom.config.schema import ExperimentConfig
from fedloom.core.errors import RunStateError
from fedloom.data.datasets import ArrayDataset
from fedloom.net.auth import Credentials
from fedloom.net.service import Service
from fedloom.net.service import handlers as method_handlers
from fedloom.net.transport import check_plaintext

__all__ = ["AsyncServer", "ServerOptions"]


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


class AsyncServer:
    """The gRPC server: :meth:`start` serves in the background, :meth:`stop` ends it."""

    def __init__(self, service: Service, cfg: ExperimentConfig, options: ServerOptions) -> None:
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
        name, handlers = method_handlers(self.service)
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
