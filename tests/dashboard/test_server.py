"""``fedloom server --dashboard``: a real four-hospital deployment streams its rounds to the page's feed."""

from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tests.net.helpers import HOSPITALS, client, free_port, server, write_config

from fedloom.engine import jsonable


def _follow(url: str, into: list[str], done: threading.Event) -> None:
    """Read the page's event stream until the dashboard closes it."""
    u = urlparse(url)
    assert u.port is not None
    conn = http.client.HTTPConnection("127.0.0.1", u.port, timeout=120)
    try:
        conn.request("GET", "/events")
        resp = conn.getresponse()
        assert resp.status == 200
        buf = b""
        while b"event: closed" not in buf:
            chunk = resp.read1(65536)
            if not chunk:
                break
            buf += chunk
        into.append(buf.decode())
    finally:
        conn.close()
        done.set()


def test_server_dashboard_streams_every_committed_round(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "exp.toml")
    port = free_port()
    srv = server(tmp_path, cfg, port, "--dashboard", "--dashboard-port", "0")
    clients = []
    try:
        deadline = time.monotonic() + 120
        url = ""
        while not url and time.monotonic() < deadline and srv.p.poll() is None:
            url = next((x[11:] for x in srv.out.read_text().splitlines() if x.startswith("dashboard: ")), "")
            time.sleep(0.1)
        assert url.startswith("http://127.0.0.1:"), srv.err.read_text()[-2000:]
        got: list[str] = []
        done = threading.Event()
        threading.Thread(target=_follow, args=(url, got, done), daemon=True).start()
        clients = [client(tmp_path, h, port) for h in HOSPITALS]
        assert srv.wait(180) == 0, srv.err.read_text()[-3000:]
        assert done.wait(30)
    finally:
        for p in [srv, *clients]:
            p.stop()
    events = [json.loads(line[6:]) for line in got[0].splitlines() if line.startswith("data: {")]
    committed = [e for e in events if e.get("type") == "round_committed"]
    rows: list[dict[str, Any]] = [
        json.loads(x) for x in (tmp_path / "srv" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [e["round"] for e in committed] == [1, 2, 3, 4]
    assert [e["metrics"] for e in committed] == jsonable(rows)
