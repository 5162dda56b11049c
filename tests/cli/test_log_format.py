"""The deployment processes' event lines: JSON for machines, text for a person at a terminal.

Real ``fedloom client`` / ``fedloom server`` processes write to a pipe or to a pseudo-terminal,
and the lines they print are parsed back.
"""

from __future__ import annotations

import datetime
import json
import os
import pty
import re
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import cli_env, fedloom_cmd

from fedloom.net.logs import format_text

TEXT_LINE = re.compile(
    r"^(?P<stamp>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) (?P<level>[A-Z]+) +(?P<proc>\S+)  (?P<event>\S+)(?:  (?P<fields>.*))?$"
)


def parse_fields(text: str) -> dict[str, Any]:
    """``k=v k2=v2``: a value is JSON where it parses as JSON up to a space, else the word itself."""
    out: dict[str, Any] = {}
    decoder = json.JSONDecoder()
    i = 0
    while i < len(text):
        eq = text.index("=", i)
        key, j = text[i:eq], eq + 1
        try:
            value, end = decoder.raw_decode(text, j)
            if end < len(text) and text[end] != " ":
                raise ValueError("a word that starts like JSON")
        except ValueError:
            end = text.find(" ", j)
            end = len(text) if end < 0 else end
            value = text[j:end]
        out[key] = value
        i = end + 1
    return out


def parse_text(line: str) -> dict[str, Any]:
    m = TEXT_LINE.match(line)
    assert m is not None, f"not a text event line: {line!r}"
    return {
        "stamp": m["stamp"],
        "level": m["level"],
        "proc": m["proc"],
        "event": m["event"],
        **parse_fields(m["fields"] or ""),
    }


def local_stamp(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def test_text_line_of_a_record() -> None:
    record = {
        "ts": 1_700_000_000.25,
        "level": "warning",
        "proc": "client:[client]",
        "event": "update_rejected",
        "round": 3,
        "reason": "norm 7.5 > max_update_norm 5.0",
        "site": "fedloom[net]",
        "clients": ["va", "[x]"],
        "ok": True,
        "count": "3",
        "note": "",
        "multi": "a\nb",
    }
    line = format_text(record)
    assert line == (
        f"{local_stamp(1_700_000_000.25)} WARNING client:[client]  update_rejected  round=3 "
        'reason="norm 7.5 > max_update_norm 5.0" site=fedloom[net] clients=["va","[x]"] ok=true '
        'count="3" note="" multi="a\\nb"'
    )
    parsed = parse_text(line)
    assert {k: v for k, v in parsed.items() if k not in ("stamp", "level", "proc", "event")} == {
        k: v for k, v in record.items() if k not in ("ts", "level", "proc", "event")
    }
    assert format_text({"ts": 0.9996, "level": "info", "proc": "server", "event": "done"}) == (
        f"{local_stamp(1.0)} INFO    server  done"
    )


class TerminalProc:
    """A fedloom process whose stderr is a pseudo-terminal (stdin and stdout are not)."""

    def __init__(self, args: Sequence[str], cwd: Path, env: dict[str, str]) -> None:
        master, slave = pty.openpty()
        self.p = subprocess.Popen(fedloom_cmd(*args), cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=slave)  # fmt: skip
        os.close(slave)
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._read, args=(master,), daemon=True)
        self._reader.start()

    def _read(self, fd: int) -> None:
        try:
            while True:
                try:
                    data = os.read(fd, 65536)
                except OSError:  # EIO: the process closed its end of the terminal
                    break
                if not data:
                    break
                self._chunks.append(data)
        finally:
            os.close(fd)

    def finish(self, timeout: float) -> tuple[int, str]:
        try:
            code = self.p.wait(timeout=timeout)
        finally:
            if self.p.poll() is None:
                self.p.kill()
                self.p.wait(timeout=10)
        self._reader.join(timeout=10)
        return code, b"".join(self._chunks).decode("utf-8", "replace").replace("\r\n", "\n")


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _give_up(
    tmp_path: Path, *, terminal: bool, extra: Sequence[str] = (), env: dict[str, str] | None = None
) -> str:
    """Run a client that no server answers (it logs that, gives up after 0.5 s, exits 4); its stderr."""
    args = ["client", "--server", "127.0.0.1:1", "--client-id", "[client]", "--give-up-after", "0.5",
            "--state-dir", str(tmp_path / "cstate"), *extra]  # fmt: skip
    run_env = {k: v for k, v in cli_env().items() if k != "FEDLOOM_LOG_FORMAT"} | (env or {})
    if terminal:
        code, err = TerminalProc(args, tmp_path, run_env).finish(timeout=120)
    else:
        proc = subprocess.run(fedloom_cmd(*args), cwd=tmp_path, env=run_env, capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        code, err = proc.returncode, proc.stderr
    assert code == 4, err
    assert _lines(err), "the client logged nothing"
    return err


def _assert_text(err: str) -> None:
    events = [parse_text(line) for line in _lines(err)]
    assert {e["proc"] for e in events} == {"client:[client]"}
    assert events[-1]["event"] == "gave_up"
    assert events[-1]["level"] == "ERROR"
    assert events[-1]["away_s"] >= 0.5
    assert "connection refused" in events[-1]["reason"]


def _assert_json(err: str) -> None:
    records = [json.loads(line) for line in _lines(err)]
    assert {r["proc"] for r in records} == {"client:[client]"}
    assert records[-1]["event"] == "gave_up"
    assert records[-1]["level"] == "error"


def test_auto_log_format_is_text_on_a_terminal_and_json_on_a_pipe(tmp_path: Path) -> None:
    pytest.importorskip("grpc", reason="the client process needs the 'net' extra (grpcio)")
    _assert_text(_give_up(tmp_path, terminal=True))
    _assert_json(_give_up(tmp_path, terminal=False))


@pytest.mark.parametrize(
    ("terminal", "extra", "env", "text"),
    [
        (False, ["--log-format", "text"], {}, True),
        (True, ["--log-format", "json"], {}, False),
        (False, [], {"FEDLOOM_LOG_FORMAT": "text"}, True),
    ],
    ids=["option-text-on-pipe", "option-json-on-terminal", "env-text-on-pipe"],
)
def test_log_format_option_or_env_overrides_the_terminal(
    tmp_path: Path, terminal: bool, extra: list[str], env: dict[str, str], text: bool
) -> None:
    pytest.importorskip("grpc", reason="the client process needs the 'net' extra (grpcio)")
    err = _give_up(tmp_path, terminal=terminal, extra=extra, env=env)
    (_assert_text if text else _assert_json)(err)


DEPLOY_TOML = """
seed = 5
rounds = 2
[model]
name = "2nn"
kwargs = { in_features = 13, hidden = 16, num_classes = 2 }
[client]
lr = 0.05
epochs = 1
batch_size = 16
[algorithm]
name = "fedavg"
[sampling]
fraction = 1.0
min_clients = 2
[data]
num_clients = 2
[eval]
target_accuracy = 0.0
[deploy]
clients = ["cleveland", "hungarian"]
deadline_s = 60.0
min_quorum = 2
heartbeat_s = 0.5
offline_after_s = 5.0
"""


def test_deployed_run_logs_text_on_a_terminal_and_json_in_its_file(tmp_path: Path) -> None:
    pytest.importorskip("grpc", reason="the deployment needs the 'net' extra (grpcio)")
    from tests.net.helpers import HEART_DIR, LOADER, free_port, server

    cfg = tmp_path / "exp.toml"
    cfg.write_text(DEPLOY_TOML, encoding="utf-8")
    port = free_port()
    env = {k: v for k, v in cli_env().items() if k != "FEDLOOM_LOG_FORMAT"}

    def client_args(site: str) -> list[str]:
        return ["client", "--server", f"127.0.0.1:{port}", "--data", f"{LOADER}:{site}",
                "--data-dir", str(HEART_DIR), "--state-dir", str(tmp_path / "cstate" / site),
                "--give-up-after", "60"]  # fmt: skip

    srv = server(tmp_path, cfg, port, "--log-format", "text")  # stderr to a file, text asked for
    on_terminal = TerminalProc(client_args("cleveland"), tmp_path, env)  # auto: a terminal, so text
    as_json = TerminalProc(client_args("hungarian"), tmp_path, env | {"FEDLOOM_LOG_FORMAT": "json"})
    try:
        assert srv.wait(240) == 0, srv.err.read_text()[-3000:]
        code_text, text_err = on_terminal.finish(timeout=60)
        code_json, json_err = as_json.finish(timeout=60)
    finally:
        srv.stop()
    assert code_text == 0, text_err[-3000:]
    assert code_json == 0, json_err[-3000:]

    # The server: every event line on stderr is text, and says what its JSON file says.
    shown = [
        parse_text(line) for line in _lines(srv.err.read_text(encoding="utf-8")) if TEXT_LINE.match(line)
    ]
    assert not [line for line in _lines(srv.err.read_text(encoding="utf-8")) if line.startswith("{")]
    filed = [json.loads(line) for line in (tmp_path / "srv" / "server.log.jsonl").read_text().splitlines()]
    assert len(shown) == len(filed) > 0
    for text_rec, json_rec in zip(shown, filed, strict=True):
        assert text_rec["stamp"] == local_stamp(json_rec["ts"])
        assert text_rec["level"] == json_rec["level"].upper()
        assert (text_rec["proc"], text_rec["event"]) == (json_rec["proc"], json_rec["event"])
        fields = {k: v for k, v in text_rec.items() if k not in ("stamp", "level", "proc", "event")}
        assert fields == {k: v for k, v in json_rec.items() if k not in ("ts", "level", "proc", "event")}
    committed = [r for r in shown if r["event"] == "round_committed"]
    assert [r["round"] for r in committed] == [1, 2]
    assert shown[-1]["event"] == "done"
    assert shown[-1]["round"] == 2

    # The client on a terminal: text lines only, ending with its rounds done.
    events = [parse_text(line) for line in _lines(text_err)]
    assert {e["proc"] for e in events} == {"client:cleveland"}
    assert [e["round"] for e in events if e["event"] == "update_accepted"] == [1, 2]
    assert events[-1]["event"] == "done"
    assert events[-1]["rounds"] == 2

    # The client told to write JSON: JSON lines even on a terminal.
    records = [json.loads(line) for line in _lines(json_err)]
    assert {r["proc"] for r in records} == {"client:hungarian"}
    assert [r["round"] for r in records if r["event"] == "update_accepted"] == [1, 2]
    assert records[-1]["event"] == "done"
