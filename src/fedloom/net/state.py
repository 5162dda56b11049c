"""The deployment's durable tables, next to :class:`~fedloom.results.store.RunStore` in one SQLite file.

RunStore keeps the run's checkpoints, metrics and meta; this module adds::

    clients(client_id PRIMARY KEY, name UNIQUE, joins, last_seen)  the registry
    pending(round, client_id, meta_json, blob)                     accepted, not yet aggregated
    audit(seq PRIMARY KEY, ts, round, client_id, client, event, bytes, detail)

``pending`` holds every accepted update of the open round, written before the
client is told "accepted", so a server killed mid-round resumes with them and no
accepted update is lost; rows of a round are deleted once its checkpoint is
committed. ``audit`` is append-only: which client contributed to which round,
bytes received, rejections with their reason, dropouts, aborted rounds.

Audit events: ``join``, ``refused``, ``accepted``, ``rejected``, ``late``,
``failed`` (the client reported a training failure), ``dropout`` (selected, no
update by the close), ``round_committed``, ``round_aborted``.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

__all__ = ["AuditRow", "NetState", "PendingUpdate"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS clients (
    client_id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, joins INTEGER NOT NULL, last_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS pending (
    round INTEGER NOT NULL, client_id INTEGER NOT NULL, meta_json TEXT NOT NULL, blob BLOB NOT NULL,
    PRIMARY KEY (round, client_id)
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, round INTEGER NOT NULL,
    client_id INTEGER NOT NULL, client TEXT NOT NULL, event TEXT NOT NULL, bytes INTEGER NOT NULL,
    detail TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class AuditRow:
    round: int
    client_id: int
    client: str
    event: str
    bytes: int
    detail: str


@dataclass(frozen=True)
class PendingUpdate:
    client_id: int
    meta_json: str
    blob: bytes


class NetState:
    """Thread-safe access to the deployment tables (one connection behind a lock)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        # WAL + synchronous=NORMAL: every commit survives a killed process (the threat here);
        # RunStore's checkpoints keep synchronous=FULL for power loss.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def __enter__(self) -> NetState:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- registry -------------------------------------------------------
    def record_join(self, client_id: int, name: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO clients VALUES (?, ?, 1, ?) ON CONFLICT(client_id) "
                "DO UPDATE SET joins = joins + 1, last_seen = excluded.last_seen",
                (client_id, name, time.time()),
            )

    def registered(self) -> dict[int, tuple[str, int]]:
        """``client_id -> (name, joins)`` of every client that ever joined."""
        with self._lock:
            rows = self._db.execute(
                "SELECT client_id, name, joins FROM clients ORDER BY client_id"
            ).fetchall()
        return {int(r[0]): (str(r[1]), int(r[2])) for r in rows}

    # ---- pending updates --------------------------------------------------
    def add_pending(
        self, round: int, client_id: int, client: str, meta_json: str, blob: bytes, detail: str
    ) -> None:
        """Store an accepted update and its audit row in one transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO pending VALUES (?, ?, ?, ?)", (round, client_id, meta_json, blob)
                )
                self._audit_locked(round, client_id, client, "accepted", len(blob), detail)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def pending(self, round: int) -> list[PendingUpdate]:
        with self._lock:
            rows = self._db.execute(
                "SELECT client_id, meta_json, blob FROM pending WHERE round = ? ORDER BY client_id", (round,)
            ).fetchall()
        return [PendingUpdate(int(r[0]), str(r[1]), bytes(r[2])) for r in rows]

    def clear_pending(self, up_to_round: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM pending WHERE round <= ?", (up_to_round,))

    # ---- audit ----------------------------------------------------------
    def audit(
        self, round: int, client_id: int, client: str, event: str, nbytes: int = 0, detail: str = ""
    ) -> None:
        with self._lock:
            self._audit_locked(round, client_id, client, event, nbytes, detail)

    def _audit_locked(
        self, round: int, client_id: int, client: str, event: str, nbytes: int, detail: str
    ) -> None:
        self._db.execute(
            "INSERT INTO audit (ts, round, client_id, client, event, bytes, detail) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (time.time(), round, client_id, client, event, nbytes, detail),
        )

    def audit_rows(self, event: str | None = None) -> list[AuditRow]:
        q = "SELECT round, client_id, client, event, bytes, detail FROM audit"
        args: tuple[str, ...] = ()
        if event is not None:
            q, args = q + " WHERE event = ?", (event,)
        with self._lock:
            rows = self._db.execute(q + " ORDER BY seq", args).fetchall()
        return [AuditRow(int(r[0]), int(r[1]), str(r[2]), str(r[3]), int(r[4]), str(r[5])) for r in rows]

    def event_counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT event, COUNT(*) FROM audit GROUP BY event").fetchall()
        return {str(r[0]): int(r[1]) for r in rows}
