"""The dashboard's web application: the page, its event stream, and the guard in front of both."""

from __future__ import annotations

import asyncio
import hmac
import threading
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from fedloom.dashboard.feed import Feed

__all__ = ["LOOPBACK_HOSTS", "Guard", "dashboard_app"]

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})
_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",  # the token may be in the page's URL
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'",
}
KEEPALIVE_S = 15.0


class Guard:
    """ASGI middleware: read-only methods, the access token, and (on loopback) the Host header.

    Every request must be ``GET`` or ``HEAD`` (else 405). With a ``token``, every request
    must carry it as ``?token=`` or ``Authorization: Bearer`` (else 401), compared in
    constant time. With ``loopback_only``, a ``Host`` other than a loopback name is
    refused (403): a page on another site cannot reach a loopback dashboard by pointing
    its own name at 127.0.0.1 (DNS rebinding).
    """

    def __init__(self, app: ASGIApp, *, token: str | None, loopback_only: bool) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.loopback_only = loopback_only

    def _presented(self, scope: Scope) -> bytes | None:
        for name, value in scope.get("headers", []):
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                return bytes(value[7:].strip())
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        given = query.get("token")
        return given[0].encode() if given else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self.app(scope, receive, send)
            return  # websockets and anything else: not served
        refusal: Response | None = None
        if scope["method"] not in ("GET", "HEAD"):
            refusal = PlainTextResponse("read-only", status_code=405, headers={"Allow": "GET, HEAD"})
        elif self.loopback_only:
            host = dict(scope.get("headers", [])).get(b"host", b"").decode("latin-1")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name not in LOOPBACK_HOSTS:
                refusal = PlainTextResponse("unexpected Host", status_code=403)
        if refusal is None and self.token is not None:
            given = self._presented(scope)
            if given is None or not hmac.compare_digest(given, self.token):
                refusal = PlainTextResponse(
                    "a valid token is required", status_code=401, headers={"WWW-Authenticate": "Bearer"}
                )
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _page() -> str:
    return resources.files("fedloom.dashboard").joinpath("page.html").read_text(encoding="utf-8")


def dashboard_app(
    run_dir: Path,
    *,
    token: str | None = None,
    loopback_only: bool = True,
    stop: threading.Event | None = None,
    poll_s: float = 0.25,
    title: str = "",
) -> ASGIApp:
    """The dashboard for the run in ``run_dir``: ``/`` is the page, ``/events`` its SSE stream.

    The stream sends each line of ``events.jsonl`` as one message, polling the file every
    ``poll_s`` seconds, and ends when ``stop`` is set. Nothing the app serves can change
    the run: it only reads the files.
    """
    page = _page().replace("{{TITLE}}", _escape(title or str(run_dir)))
    halt = stop if stop is not None else threading.Event()

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers=_HEADERS)

    async def events(request: Request) -> Response:
        feed = Feed(run_dir, request.headers.get("last-event-id"))

        async def stream() -> AsyncIterator[str]:
            yield "retry: 1000\n\n"
            idle = 0.0
            while not halt.is_set():
                messages = feed.poll()
                for m in messages:
                    yield m
                if messages:
                    idle = 0.0
                    continue  # more may be waiting (a long history arrives chunk by chunk)
                if await request.is_disconnected():
                    return
                if idle >= KEEPALIVE_S:
                    yield ": keepalive\n\n"
                    idle = 0.0
                await asyncio.sleep(poll_s)
                idle += poll_s
            while messages := feed.poll():  # what the run wrote before it stopped, to its last line
                for m in messages:
                    yield m
            yield "event: closed\ndata: {}\n\n"

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={**_HEADERS, "X-Accel-Buffering": "no"}
        )

    app = Starlette(routes=[Route("/", index), Route("/events", events)])
    return Guard(app, token=token, loopback_only=loopback_only)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
