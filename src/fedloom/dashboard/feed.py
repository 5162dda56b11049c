"""Tail a run's log files: complete new lines from a byte offset, as SSE messages."""

from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["CHUNK", "Feed", "read_lines"]

CHUNK = 1 << 20  # bytes read per poll: a long run's history arrives in pieces, not one message


def read_lines(path: Path, offset: int, limit: int = CHUNK) -> tuple[list[tuple[int, str]], int]:
    """The complete lines of ``path`` from byte ``offset`` (at most about ``limit`` bytes of them).

    Returns ``([(end offset, line), ...], new offset)``. A last line without its newline
    (a writer mid-line) is left for the next call; a missing file reads as empty. A file
    shorter than ``offset`` (replaced) returns offset ``-1``.
    """
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            size = f.tell()
            if size < offset:
                return [], -1
            f.seek(offset)
            data = f.read(limit)
    except FileNotFoundError:
        return [], offset
    out: list[tuple[int, str]] = []
    pos = 0
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            break
        line = data[pos:nl].decode("utf-8", errors="replace").strip()
        pos = nl + 1
        if line:
            out.append((offset + pos, line))
    if not out and len(data) == limit and pos == 0:  # one line longer than the chunk: skip it whole
        return [], offset + len(data)
    return out, offset + pos


def _metrics_row_as_event(line: str) -> str | None:
    """A ``metrics.jsonl`` row as the JSON of its round-committed event (``None``: not a row)."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    if not isinstance(row, dict) or not isinstance(row.get("round"), int):
        return None

    def clean(v: object) -> object:  # JSON has no NaN: as in events.jsonl, a non-finite value is null
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v

    return json.dumps({"type": "round_committed", "round": row["round"], "metrics": clean(row)})


class Feed:
    """One browser's position in a run directory's log, read as SSE messages.

    Follows ``events.jsonl``; while that file does not exist and ``metrics.jsonl`` does,
    follows the metrics rows instead (as round-committed events), and once ``events.jsonl``
    appears, tells the browser to reset and follows it from its start. The SSE ``id`` of each message is the file (``e`` or ``m``) and the byte
    offset after it, so a reconnecting browser resumes where it left off.
    """

    def __init__(self, run_dir: Path, last_event_id: str | None = None) -> None:
        self.run_dir = run_dir
        self.source: str | None = None
        self.offset = 0
        if last_event_id and last_event_id[:1] in ("e", "m") and last_event_id[1:].isdigit():
            self.source, self.offset = last_event_id[0], int(last_event_id[1:])

    def _choose(self) -> str | None:
        if (self.run_dir / "events.jsonl").exists():
            return "e"
        if (self.run_dir / "metrics.jsonl").exists():
            return "m"
        return None

    def poll(self) -> list[str]:
        """The SSE messages for whatever was appended since the last poll (possibly none)."""
        head: list[str] = []
        if self.source is None:
            self.source = self._choose()
            if self.source is None:
                return []
        elif self.source == "m" and self._choose() == "e":
            self.source, self.offset = "e", 0
            head = ["event: reset\ndata: {}\n\n"]
        name = "events.jsonl" if self.source == "e" else "metrics.jsonl"
        lines, offset = read_lines(self.run_dir / name, self.offset)
        if offset < 0:  # the file was replaced: start again from its beginning
            self.offset = 0
            return ["event: reset\ndata: {}\n\n"]
        self.offset = offset
        out = head
        for end, line in lines:
            data = line if self.source == "e" else _metrics_row_as_event(line)
            if data is not None:
                out.append(f"id: {self.source}{end}\ndata: {data}\n\n")
        return out
