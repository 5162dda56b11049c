"""The run's state database (SQLite): run metadata, per-round checkpoints, metrics, client state.

One transaction per round writes the new server state, that round's metrics and
any changed client states, so a process killed at any instant leaves the
database at the last completed round. Tensors are stored as safetensors blobs.

Tables::

    meta(key PRIMARY KEY, value)                 config, status, last error
    checkpoints(round PRIMARY KEY, params, opt_state, algo_state)
    metrics(round PRIMARY KEY, json)
    client_states(client_id PRIMARY KEY, round, blob)
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from fedloom.algorithms.api import ClientState, ServerState
from fedloom.core.errors import RunStateError
from fedloom.core.serde import params_from_bytes, params_to_bytes, slots_from_bytes, slots_to_bytes

__all__ = ["RunStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (
    round INTEGER PRIMARY KEY, params BLOB NOT NULL, opt_state BLOB NOT NULL, algo_state BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS metrics (round INTEGER PRIMARY KEY, json TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS client_states (client_id INTEGER PRIMARY KEY, round INTEGER NOT NULL, blob BLOB NOT NULL);
"""


class RunStore:
    """A run's SQLite state database. Use as a context manager, or call :meth:`close`."""

    def __init__(self, path: Path, *, create: bool = False) -> None:
        if not create and not path.exists():
            raise RunStateError(f"state database {path} does not exist; is this a fedloom run directory?")
        self.path = path
        try:
            self._db = sqlite3.connect(path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise RunStateError(f"state database {path} is unusable: {exc}") from exc

    def __enter__(self) -> RunStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    # ---- metadata -------------------------------------------------------
    def set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    # ---- rounds ---------------------------------------------------------
    def commit_round(
        self,
        state: ServerState,
        metrics: Mapping[str, Any],
        client_states: Mapping[int, ClientState],
        *,
        keep: int,
    ) -> None:
        """Atomically record round ``state.round``; keep the newest ``keep`` checkpoints (0 = all)."""
        r = state.round
        rows = (
            r,
            params_to_bytes(state.params),
            slots_to_bytes(state.opt_state),
            slots_to_bytes(state.algo_state),
        )
        with self._transaction():
            self._db.execute("INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?)", rows)
            self._db.execute("INSERT OR REPLACE INTO metrics VALUES (?, ?)", (r, json.dumps(dict(metrics))))
            for cid, cs in client_states.items():
                self._db.execute(
                    "INSERT OR REPLACE INTO client_states VALUES (?, ?, ?)",
                    (cid, r, slots_to_bytes(cs.values)),
                )
            if keep > 0:
                self._db.execute(
                    "DELETE FROM checkpoints WHERE round NOT IN "
                    "(SELECT round FROM checkpoints ORDER BY round DESC LIMIT ?)",
                    (keep,),
                )

    def _transaction(self) -> _Tx:
        return _Tx(self._db)

    def latest_round(self) -> int:
        row = self._db.execute("SELECT MAX(round) FROM checkpoints").fetchone()
        return -1 if row is None or row[0] is None else int(row[0])

    def load_state(self, round: int | None = None) -> ServerState:
        """The checkpoint of ``round`` (default: the latest)."""
        r = self.latest_round() if round is None else round
        row = self._db.execute(
            "SELECT params, opt_state, algo_state FROM checkpoints WHERE round = ?", (r,)
        ).fetchone()
        if row is None:
            raise RunStateError(f"{self.path} has no checkpoint for round {r}")
        return ServerState(
            round=r,
            params=params_from_bytes(row[0]),
            opt_state=slots_from_bytes(row[1]),
            algo_state=slots_from_bytes(row[2]),
        )

    def metrics(self, up_to: int | None = None) -> list[dict[str, Any]]:
        """Per-round metrics in round order, up to and including ``up_to``."""
        limit = self.latest_round() if up_to is None else up_to
        rows = self._db.execute(
            "SELECT json FROM metrics WHERE round <= ? ORDER BY round", (limit,)
        ).fetchall()
        return [json.loads(r[0]) for r in rows]

    def client_states(self) -> dict[int, ClientState]:
        rows = self._db.execute("SELECT client_id, blob FROM client_states ORDER BY client_id").fetchall()
        return {int(cid): ClientState(values=slots_from_bytes(blob)) for cid, blob in rows}


class _Tx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._db.execute("ROLLBACK" if exc_type is not None else "COMMIT")
