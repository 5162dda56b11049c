"""Structured logs: one JSON object per line on stderr (and optionally a file).

Each line has ``ts`` (Unix seconds), ``level``, ``proc`` ("server" or "client:<name>"),
``event`` and the event's fields, so ``jq`` or a log shipper can filter them.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

__all__ = ["JsonLog"]


class JsonLog:
    """A tiny thread-safe JSON-lines logger."""

    def __init__(self, proc: str, *, file: Path | None = None, stream: TextIO | None = None) -> None:
        self.proc = proc
        self._stream = stream if stream is not None else sys.stderr
        self._file = file.open("a", encoding="utf-8") if file is not None else None
        self._lock = threading.Lock()

    def __call__(self, event: str, level: str = "info", **fields: Any) -> None:
        record = {"ts": round(time.time(), 3), "level": level, "proc": self.proc, "event": event, **fields}
        line = json.dumps(record, default=str) + "\n"
        with self._lock:
            self._stream.write(line)
            self._stream.flush()
            if self._file is not None:
                self._file.write(line)
                self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
