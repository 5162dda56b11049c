"""The run's state database (SQLite): run metadata, per-round checkpoints, metrics, client state.

One transaction per round writes the new server state, that round's metrics and
any changed client states, so a process killed at any instant leaves the
database at the last completed round. Tensors are stored as safetensors blobs.

Tables::

    meta(key PRIMARY KEY, value)                 config, status, last error
    checkpoint_files(round PRIMARY KEY, file, sizes, checksum)
    metrics(round PRIMARY KEY, json)
    client_states(client_id PRIMARY KEY, round, blob)

A checkpoint's tensors (params, optimiser and algorithm state, three safetensors blobs back
to back) live in a file ``checkpoints/ckpt-<n>.bin`` beside the database; its row names the
file, the three sizes and a CRC-32 of the content. The file is written and ``fdatasync``'d
*before* the transaction that adds its row commits, into a file that no live row names, so
the row never points at a torn file, whatever the moment of a kill or a power loss. Files of
deleted rows are reused in place (``keep`` + 1 files in all). For the 2NN's 0.8 MB under
``synchronous=FULL`` a commit takes about 2.3 ms of wall time and 0.6 ms of CPU, against 7.8
and 4.4 ms with the blobs inside SQLite, which writes each blob twice (the WAL, then the main
file) and walks the overflow-page chain of the checkpoint it deletes; the deployed server pays
this once per round on its critical path.
"""

from __future__ import annotations

import json
import os
import sqlite3
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from fedloom.algorithms.api import ClientState, ServerState
from fedloom.core.errors import RunStateError
from fedloom.core.serde import slots_from_bytes, slots_to_bytes, slots_to_pieces

__all__ = ["CHECKPOINT_DIR", "RunStore", "orphan_artefacts"]

CHECKPOINT_DIR = "checkpoints"
_ROUNDS = "SELECT round FROM checkpoint_files"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoint_files (
    round INTEGER PRIMARY KEY, file TEXT NOT NULL, sizes TEXT NOT NULL, checksum TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS metrics (round INTEGER PRIMARY KEY, json TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS client_states (client_id INTEGER PRIMARY KEY, round INTEGER NOT NULL, blob BLOB NOT NULL);
"""


def _answer(db: Path, query: str) -> int | None:
    """The integer ``query`` answers on ``db``, read-only; ``None`` for NULL, a missing table or no database."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            row = con.execute(query).fetchone()
        finally:
            con.close()
    except sqlite3.DatabaseError:  # no such table, an empty file, or not a database
        return None
    return None if row is None or row[0] is None else int(row[0])


def orphan_artefacts(directory: Path, db: Path) -> list[str]:
    """The run artefacts in ``directory`` that a run whose database ``db`` holds no checkpoint must
    not overwrite: non-empty checkpoint files, a non-empty ``metrics.jsonl``, a final model, pending
    update blobs. Empty when ``db`` holds a checkpoint or pending updates, or when there are none
    (a fresh directory).

    Such a directory is one whose database was deleted, replaced, or copied without its ``-wal``
    file (where the committed rounds live until a WAL checkpoint): starting a fresh run there
    would silently destroy the run the files belong to.
    """
    if db.exists():
        checkpointed = _answer(db, f"SELECT MAX(round) FROM ({_ROUNDS})") is not None
        pending = _answer(db, "SELECT COUNT(*) FROM pending_updates") or 0
        if checkpointed or pending > 0:  # the database holds a run (pending updates it names are its own)
            return []
    found = []
    for sub in (CHECKPOINT_DIR, "pending"):
        folder = directory / sub
        if folder.is_dir() and any(f.is_file() and f.stat().st_size > 0 for f in folder.iterdir()):
            found.append(f"{sub}/")
    for name in ("metrics.jsonl", "model.safetensors"):
        f = directory / name
        if f.is_file() and f.stat().st_size > 0:
            found.append(name)
    return found


class RunStore:
    """A run's SQLite state database. Use as a context manager, or call :meth:`close`."""

    def __init__(self, path: Path, *, create: bool = False) -> None:
        if not create and not path.exists():
            raise RunStateError(f"state database {path} does not exist; is this a fedloom run directory?")
        self.path = path
        self.checkpoint_dir = path.parent / CHECKPOINT_DIR
        try:
            # One thread at a time, not always the opening one: the deployed server commits rounds
            # on a thread of its own (see fedloom.engine.commit.ThreadedCommitter).
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
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
        parts = [slots_to_pieces({"": state.params}), slots_to_pieces(state.opt_state)]
        parts.append(slots_to_pieces(state.algo_state))
        name = self._free_file()
        try:
            sizes, checksum = _write_synced(self.checkpoint_dir / name, parts)
        except OSError as exc:  # e.g. a full disk: the previous checkpoint stays the latest
            raise RunStateError(
                f"cannot write the checkpoint of round {r} to {self.checkpoint_dir / name}: {exc}; "
                f"checkpoint {self.latest_round()} is intact"
            ) from exc
        with self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO checkpoint_files VALUES (?, ?, ?, ?)",
                (r, name, ",".join(map(str, sizes)), checksum),
            )
            self._db.execute("INSERT OR REPLACE INTO metrics VALUES (?, ?)", (r, json.dumps(dict(metrics))))
            for cid, cs in client_states.items():
                self._db.execute(
                    "INSERT OR REPLACE INTO client_states VALUES (?, ?, ?)",
                    (cid, r, slots_to_bytes(cs.values)),
                )
            if keep > 0:
                newest = f"SELECT round FROM ({_ROUNDS}) ORDER BY round DESC LIMIT ?"
                self._db.execute(f"DELETE FROM checkpoint_files WHERE round NOT IN ({newest})", (keep,))

    def _free_file(self) -> str:
        """The first ``ckpt-<n>.bin`` that no row names (with ``keep`` = k, one of the first k + 1)."""
        used = {str(f) for (f,) in self._db.execute("SELECT file FROM checkpoint_files")}
        n = 0
        while f"ckpt-{n:06d}.bin" in used:
            n += 1
        return f"ckpt-{n:06d}.bin"

    def _transaction(self) -> _Tx:
        return _Tx(self._db)

    def latest_round(self) -> int:
        row = self._db.execute(f"SELECT MAX(round) FROM ({_ROUNDS})").fetchone()
        return -1 if row is None or row[0] is None else int(row[0])

    def load_state(self, round: int | None = None) -> ServerState:
        """The checkpoint of ``round`` (default: the latest)."""
        r = self.latest_round() if round is None else round
        row = self._db.execute(
            "SELECT file, sizes, checksum FROM checkpoint_files WHERE round = ?", (r,)
        ).fetchone()
        if row is None:
            raise RunStateError(f"{self.path} has no checkpoint for round {r}")
        blobs = _read_checked(self.checkpoint_dir / str(row[0]), str(row[1]), str(row[2]), r)
        return ServerState(
            round=r,
            params=slots_from_bytes(blobs[0])[""],
            opt_state=slots_from_bytes(blobs[1]),
            algo_state=slots_from_bytes(blobs[2]),
        )

    def rounds(self) -> list[int]:
        """The rounds whose checkpoints are kept, ascending."""
        return [int(r) for (r,) in self._db.execute(f"SELECT round FROM ({_ROUNDS}) ORDER BY round")]

    def roll_back(self, round: int) -> None:
        """Make the kept checkpoint of ``round`` the latest: later checkpoints, metrics and client
        states are deleted in one transaction (their checkpoint files are reused by later commits).

        Raises :class:`RunStateError` if ``round`` has no kept checkpoint or it does not read back intact.
        """
        kept = self.rounds()
        if round not in kept:
            raise RunStateError(f"{self.path} keeps no checkpoint of round {round}; kept rounds: {kept}")
        self.load_state(round)  # its file must be intact before anything newer is given up
        with self._transaction():
            for table in ("checkpoint_files", "metrics", "client_states"):
                self._db.execute(f"DELETE FROM {table} WHERE round > ?", (round,))

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


def _write_synced(path: Path, parts: Sequence[Sequence[bytes | memoryview]]) -> tuple[list[int], str]:
    """Make ``path`` hold the blobs ``parts`` (each in pieces) back to back, on disk: (sizes, checksum)."""
    sizes = [sum(memoryview(p).nbytes for p in pieces) for pieces in parts]
    flat = [memoryview(p).cast("B") for pieces in parts for p in pieces]
    crc = 0
    for piece in flat:
        crc = zlib.crc32(piece, crc)
    created = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    total = sum(sizes)
    if not hasattr(os, "pwritev"):  # macOS, Windows: one joined copy
        flat = [memoryview(b"".join(flat))]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o600)
    try:
        done = 0
        while flat:  # written in place (a reused file's cached pages are overwritten)
            batch = flat[:_IOV_MAX]
            n = os.pwritev(fd, batch, done) if hasattr(os, "pwritev") else _pwrite(fd, batch[0], done)
            done += n
            while flat and n >= flat[0].nbytes:
                n -= flat[0].nbytes
                flat.pop(0)
            if flat and n:
                flat[0] = flat[0][n:]
        if os.fstat(fd).st_size != total:
            os.ftruncate(fd, total)
        getattr(os, "fdatasync", os.fsync)(fd)  # macOS has no fdatasync
    finally:
        os.close(fd)
    if created and os.name == "posix":  # the new name itself must survive a power loss too
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return sizes, f"crc32:{crc:08x}"


# At most this many buffers per pwritev call (the system's IOV_MAX; a checkpoint of a model with
# hundreds of tensors and Adam's two moments has more pieces than that).
_IOV_MAX = max(16, os.sysconf("SC_IOV_MAX")) if "SC_IOV_MAX" in getattr(os, "sysconf_names", {}) else 1024


def _pwrite(fd: int, data: memoryview, offset: int) -> int:
    if hasattr(os, "pwrite"):
        return os.pwrite(fd, data, offset)
    os.lseek(fd, offset, os.SEEK_SET)
    return os.write(fd, data)


def _read_checked(path: Path, sizes_text: str, checksum: str, round: int) -> list[memoryview]:
    try:
        data = path.read_bytes()
        sizes = [int(x) for x in sizes_text.split(",")]
    except (OSError, ValueError) as exc:
        raise RunStateError(f"checkpoint of round {round} ({path}) cannot be read: {exc}") from exc
    if len(sizes) != 3 or sum(sizes) != len(data) or f"crc32:{zlib.crc32(data):08x}" != checksum:
        raise RunStateError(
            f"checkpoint of round {round} ({path}) is damaged: {len(data)} bytes, expected {sum(sizes)}, "
            "or its checksum does not match"
        )
    view = memoryview(data)
    a, b = sizes[0], sizes[0] + sizes[1]
    return [view[:a], view[a:b], view[b:]]
