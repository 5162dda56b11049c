"""Serve the dashboard from a background thread while a run goes on in the foreground."""

from __future__ import annotations

import ipaddress
import logging
import secrets
import socket
import threading
from pathlib import Path

from fedloom.core.errors import ConfigError, FedloomError

__all__ = ["DashboardServer", "is_loopback", "resolve_token", "start_dashboard"]


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_token(host: str, token: str | None) -> str | None:
    """The token the dashboard will demand: ``token`` if given, a fresh random one for a
    non-loopback ``host``, else none (loopback needs none)."""
    if token:
        return token
    return None if is_loopback(host) else secrets.token_urlsafe(24)


class DashboardServer:
    """A running dashboard: uvicorn on its own thread and event loop, on a socket bound here.

    Binding happens in the constructor, so a taken port fails before any training and
    port 0 is resolved (``url`` carries the real port and, when one is demanded, the
    token). :meth:`close` ends the event streams and stops the server.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        title: str = "",
    ) -> None:
        try:
            import uvicorn

            from fedloom.dashboard.app import dashboard_app
        except ImportError as exc:
            raise ConfigError(
                [f"--dashboard needs the 'dashboard' extra: pip install 'fedloom[dashboard]' ({exc})"]
            ) from None
        self.token = resolve_token(host, token)
        self._stop = threading.Event()
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host.strip("[]"), port))
            sock.listen(64)
        except OSError as exc:
            sock.close()
            raise FedloomError(f"dashboard: cannot listen on {host}:{port}: {exc}") from None
        self._sock = sock
        self.port = int(sock.getsockname()[1])
        shown = f"[{host.strip('[]')}]" if family == socket.AF_INET6 else host
        self.url = f"http://{shown}:{self.port}/" + (f"?token={self.token}" if self.token else "")
        app = dashboard_app(
            run_dir, token=self.token, loopback_only=is_loopback(host), stop=self._stop, title=title
        )
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=2
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, name="fedloom-dashboard", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            self._server.run(sockets=[self._sock])
        except Exception:  # the run must go on without its page
            logging.getLogger("fedloom").exception("dashboard stopped")

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving: open event streams end, then the server shuts down (idempotent)."""
        self._stop.set()
        self._server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()


def start_dashboard(
    run_dir: Path, *, host: str = "127.0.0.1", port: int = 0, token: str | None = None, title: str = ""
) -> DashboardServer:
    """Serve the dashboard of the run in ``run_dir`` on ``host:port`` (0: any free port) until closed."""
    return DashboardServer(run_dir, host=host, port=port, token=token, title=title)
