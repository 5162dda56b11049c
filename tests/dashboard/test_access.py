"""The dashboard's guard on a real uvicorn server: read-only, a token off loopback, loopback Host names."""

from __future__ import annotations

import http.client
import json
import re
import sys
from pathlib import Path

import pytest

from fedloom.dashboard import DashboardServer, is_loopback, resolve_token, start_dashboard


def _request(
    port: int, path: str, *, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        if not resp.getheader("content-type", "").startswith("text/event-stream"):
            return resp.status, resp.read()
        body = b""  # the event stream never ends by itself: read up to its first event
        while b"data: " not in body or not body.endswith(b"\n\n"):
            body += resp.read1(4096)
        return resp.status, body
    finally:
        conn.close()


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    event = {"type": "round_opened", "round": 1, "time": 1.0}
    (d / "events.jsonl").write_text(json.dumps(event) + "\n", encoding="utf-8")
    return d


def test_bound_off_loopback_every_request_needs_the_token(run_dir: Path) -> None:
    board = start_dashboard(run_dir, host="0.0.0.0", port=0)
    try:
        assert board.token is not None
        assert len(board.token) >= 32
        assert board.url == f"http://0.0.0.0:{board.port}/?token={board.token}"
        for path in ("/", "/events", "/nothing"):
            assert _request(board.port, path)[0] == 401
            assert _request(board.port, path + "?token=" + board.token[:-1] + "x")[0] == 401
            assert _request(board.port, path, headers={"Authorization": "Bearer wrong"})[0] == 401
        status, body = _request(board.port, "/?token=" + board.token)
        assert status == 200
        assert b'<svg id="chart-accuracy"' in body
        status, body = _request(board.port, "/", headers={"Authorization": f"Bearer {board.token}"})
        assert status == 200
        status, body = _request(board.port, "/events?token=" + board.token)
        assert status == 200
        assert b'data: {"type": "round_opened", "round": 1, "time": 1.0}' in body
        # Read-only, even with the token.
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            assert _request(board.port, "/?token=" + board.token, method=method)[0] == 405
    finally:
        board.close()


def test_a_given_token_is_used_and_loopback_refuses_foreign_host_names(run_dir: Path) -> None:
    board = DashboardServer(run_dir, host="127.0.0.1", port=0, token="s3cret-token")
    try:
        assert board.url.endswith("/?token=s3cret-token")
        assert _request(board.port, "/")[0] == 401
        assert _request(board.port, "/?token=s3cret-token")[0] == 200
        # A page elsewhere that points its own name at 127.0.0.1 is refused (DNS rebinding).
        assert _request(board.port, "/?token=s3cret-token", headers={"Host": "evil.example"})[0] == 403
        assert (
            _request(board.port, "/?token=s3cret-token", headers={"Host": f"localhost:{board.port}"})[0]
            == 200
        )
    finally:
        board.close()
    open_board = start_dashboard(run_dir)  # loopback, no token given: none demanded
    try:
        assert open_board.token is None
        assert _request(open_board.port, "/")[0] == 200
        assert _request(open_board.port, "/", method="POST")[0] == 405
    finally:
        open_board.close()


def test_token_rules() -> None:
    assert is_loopback("127.0.0.1")
    assert is_loopback("127.8.0.1")
    assert is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0")
    assert not is_loopback("192.168.1.4")
    assert not is_loopback("example.org")
    assert resolve_token("127.0.0.1", None) is None
    assert resolve_token("127.0.0.1", "t") == "t"
    fresh = {resolve_token("0.0.0.0", None) for _ in range(3)}
    assert len(fresh) == 3
    assert None not in fresh


def test_a_missing_extra_names_its_install_command(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedloom.core.errors import ConfigError

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if the 'dashboard' extra were not installed
    with pytest.raises(ConfigError, match=re.escape("pip install 'fedloom[dashboard]'")):
        start_dashboard(run_dir)
