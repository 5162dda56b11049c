"""Structured logs of the deployment processes: one event per line on stderr (and a JSON-lines file).

An event is a record with ``ts`` (Unix seconds), ``level``, ``proc`` ("server" or
"client:<name>"), ``event`` and the event's fields. It is written as one JSON object per
line, so ``jq`` or a log shipper can filter it, or, for a person at a terminal, as one text
line (:func:`format_text`)::

    2026-01-31 14:02:07.512 INFO    client:cleveland  update_accepted  round=3 bytes=5392 compute_s=0.21

The format of the stream is chosen by :data:`LogFormat`; the file copy is always JSON.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TextIO

__all__ = ["JsonLog", "LogFormat", "format_text"]

LogFormat = Literal["auto", "json", "text"]
"""``json``: JSON lines; ``text``: :func:`format_text` lines; ``auto``: text when the stream is a
terminal, JSON otherwise (a pipe, a file, a log collector)."""

_RECORD_KEYS = ("ts", "level", "proc", "event")


def _is_word(value: str) -> bool:
    if not value or not value.isprintable() or any(c in value for c in ' "=\\'):
        return False
    try:
        json.loads(value)
    except ValueError:
        return True
    return False  # "3", "true", "null": quoted, so that they read back as strings


def _value(value: Any) -> str:
    """A field's value as one token: a plain word as is, anything else as compact JSON."""
    if isinstance(value, str) and _is_word(value):
        return value
    return json.dumps(value, default=str, ensure_ascii=False, separators=(",", ":"))


def format_text(record: Mapping[str, Any]) -> str:
    """One log record as a line for a person: local time, level, process, event, ``key=value`` fields.

    The time is local, to the millisecond (``YYYY-MM-DD HH:MM:SS.mmm``); the level is upper
    case. A string field that is one printable word without ``"``, ``=`` or ``\\`` and is not
    itself JSON (``3``, ``true``) is written as is; every other value (numbers, lists, strings
    with spaces or newlines) is written as compact JSON. So a line never breaks, and each
    ``key=value`` reads back as ``json.loads(value)``, or ``value`` itself where that fails.
    """
    seconds, ms = divmod(round(float(record["ts"]) * 1000), 1000)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) + f".{ms:03d}"
    fields = " ".join(f"{k}={_value(v)}" for k, v in record.items() if k not in _RECORD_KEYS)
    head = f"{stamp} {str(record['level']).upper():<7} {record['proc']}  {record['event']}"
    return f"{head}  {fields}" if fields else head


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or file-less stream
        return False


class JsonLog:
    """A tiny thread-safe event logger: ``log("event", level="warning", **fields)``.

    Writes each event to ``stream`` (default stderr) as :data:`LogFormat` ``fmt`` says, and
    as a JSON line to ``file`` when given.
    """

    def __init__(
        self, proc: str, *, file: Path | None = None, stream: TextIO | None = None, fmt: LogFormat = "json"
    ) -> None:
        self.proc = proc
        self._stream = stream if stream is not None else sys.stderr
        self._text = fmt == "text" or (fmt == "auto" and _is_terminal(self._stream))
        self._file = file.open("a", encoding="utf-8") if file is not None else None
        self._lock = threading.Lock()

    def __call__(self, event: str, level: str = "info", **fields: Any) -> None:
        record = {"ts": round(time.time(), 3), "level": level, "proc": self.proc, "event": event, **fields}
        line = json.dumps(record, default=str) + "\n"
        shown = format_text(record) + "\n" if self._text else line
        with self._lock:
            self._stream.write(shown)
            self._stream.flush()
            if self._file is not None:
                self._file.write(line)
                self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
