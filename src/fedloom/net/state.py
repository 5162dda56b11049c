"""The deployment's durable tables, next to :class:`~fedloom.results.store.RunStore` in one SQLite file.

RunStore keeps the run's checkpoints, metrics and meta; this module adds::

    clients(client_id PRIMARY KEY, name UNIQUE, joins, last_seen)            the registry
    pending_updates(round, client_id, meta_json, file, checksum, bytes)      accepted, not yet aggregated
    cohorts(round PRIMARY KEY, clients)                                       each round's selection (JSON ids)
    audit(seq PRIMARY KEY, ts, round, client_id, client, event, bytes, detail)

``pending_updates`` holds every accepted update of the open round, recorded before
the client is told "accepted", so a server killed mid-round resumes with them and
no accepted update is lost; rows (and files) of a round are deleted once its
checkpoint is committed. The tensor blob of a pending update lives in a file
``pending/slot-<n>.bin`` beside the database; the row names it and carries its
checksum (XXH3-64, ``"xxh3:<16 hex>"``) and size. Slot files are reused: once a round's rows are deleted their
files return to a free pool and the next round's uploads overwrite them in place. ``audit`` is append-only:
which client contributed to which round, bytes received, rejections with their
reason, dropouts, aborted rounds.

Notes
-----
Durability. The blob file is written completely and renamed into place *before*
the row and its ``accepted`` audit line commit (one transaction), and the client
hears "accepted" only after that commit. Neither step calls fsync: the database
runs in WAL mode with ``synchronous=NORMAL``, and the file sits in the page cache,
so both survive the process being killed (SIGKILL, OOM, a crash) -- the failure
this runtime promises to survive bit-exactly. An operating-system crash or power
loss can lose the last few commits and files; a row whose file is then missing
or does not match its checksum is dropped at resume (logged by the caller), and
the client, still selected and without an accepted update, is asked again.
RunStore's checkpoints keep ``synchronous=FULL``. Keeping 16 MB of blobs per
round out of SQLite matters for speed: in the database every blob would be written
twice (WAL, then checkpointed into the main file, with fsyncs at each WAL
checkpoint) and deleting it would walk its overflow-page chain. Reusing slot files
matters too: overwriting a cached file of the same size is a memory copy (about
0.02 ms for the 2NN's 0.8 MB), where creating, filling and later unlinking a new
file costs about 1 ms per update on ext4. A reused slot keeps a shared memory mapping,
so overwriting it is a store into the page cache with no system call, and the coordinator decodes
the update from that mapping (:meth:`NetState.view`): its tensors are views of the page cache, valid
until the slot is freed and reused (after the round's checkpoint). A slot is in exactly one of three
places: the free pool, owned by one upload being staged, or named by a row.

Checksum. The check only has to catch a torn or stale file after an OS crash (a
reused slot still holding an older round's bytes of the same size), not an
adversary: whoever can write the state directory can rewrite the row too. XXH3-64
(the ``xxhash`` package) does that at about 35 GB/s, where zlib's CRC-32 managed
3 GB/s and SHA-256 1.7 GB/s here (0.022, 0.26 and 0.47 ms per 0.8 MB update, on
the server's critical resource, its two cores; perf had CRC-32 at 7% of the
server's and 8% of the clients' CPU).

Audit events: ``join``, ``refused``, ``accepted``, ``rejected``, ``late``,
``failed`` (the client reported a training failure), ``dropout`` (selected, no
update by the close), ``pending_lost`` (an accepted update whose blob was lost; its row
is dropped and the client asked again), ``round_committed``, ``round_aborted``, ``rollback``
(see :mod:`fedloom.net.rollback`). ``refused`` rows are rate-limited (see :mod:`fedloom.net.refusals`).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from fedloom.core.errors import RunStateError
from fedloom.net.wire import fingerprint

__all__ = ["AuditRow", "NetState", "PendingUpdate", "StagedBlob", "blob_checksum"]

PENDING_DIR = "pending"
# Slot files kept mapped for writing (see NetState._write); each mapping holds a file descriptor.
_MAPPED_SLOTS = 256

_SCHEMA = """
CREATE TABLE IF NOT EXISTS clients (
    client_id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, joins INTEGER NOT NULL, last_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS pending_updates (
    round INTEGER NOT NULL, client_id INTEGER NOT NULL, meta_json TEXT NOT NULL, file TEXT NOT NULL,
    checksum TEXT NOT NULL, bytes INTEGER NOT NULL, PRIMARY KEY (round, client_id)
);
CREATE TABLE IF NOT EXISTS cohorts (round INTEGER PRIMARY KEY, clients TEXT NOT NULL);
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


@dataclass(frozen=True)
class StagedBlob:
    """An update blob written to its file but not yet recorded (see :meth:`NetState.stage`)."""

    round: int
    client_id: int
    file: str
    checksum: str
    bytes: int


class NetState:
    """Thread-safe access to the deployment tables (one connection behind a lock)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.blob_dir = path.parent / PENDING_DIR
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # WAL + synchronous=NORMAL: every commit survives a killed process (the threat here);
        # RunStore's checkpoints keep synchronous=FULL for power loss. See the module Notes.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._pool_lock = threading.Lock()
        self._maps: dict[str, mmap.mmap] = {}  # slot -> its kept shared mapping (see _write)
        self._free: list[str] = []
        self._next_slot = 0
        self._init_pool()

    def __enter__(self) -> NetState:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._unmap()
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
    def stage(
        self, round: int, client_id: int, blob: bytes | memoryview, *, checksum: str = ""
    ) -> StagedBlob:
        """Write ``blob`` to a free slot file (no database lock held: callers stage concurrently).

        ``checksum`` is :func:`blob_checksum` of the blob if the caller has it already. The file counts
        only once :meth:`record_pending` committed its row; a staged blob that is not
        recorded goes back to the pool with :meth:`discard`. Raises :class:`RunStateError` when the
        blob cannot be written (a full disk), never a signal.
        """
        name = self._take_slot()
        try:
            self._write(name, blob)
        except OSError as exc:  # e.g. ENOSPC: the update is refused with the reason, the server goes on
            self._release_slots([name])
            raise RunStateError(f"the server cannot store the update ({len(blob)} bytes): {exc}") from exc
        except BaseException:
            self._release_slots([name])
            raise
        return StagedBlob(round, client_id, name, checksum or blob_checksum(blob), len(blob))

    def _write(self, name: str, blob: bytes | memoryview) -> None:
        """Make slot ``name`` hold exactly ``blob``: through its kept shared mapping when it has one.

        A store into a ``MAP_SHARED`` mapping lands in the same page cache as ``pwrite`` (so it
        survives the process being killed, as the module Notes require) without the file-write
        path per call, which saves the server about 2 ms of CPU per round at 20 clients on 2 cores
        (``benchmarks/bench_net.py``). Up to :data:`_MAPPED_SLOTS` slots stay mapped
        (each mapping holds a file descriptor); others, and empty blobs, are written with ``pwrite``.
        """
        n = len(blob)
        with self._pool_lock:
            mapped = self._maps.pop(name, None)
        if mapped is not None and len(mapped) != n:
            _close_map(mapped)
            mapped = None
        if mapped is None and n > 0 and len(self._maps) < _MAPPED_SLOTS:
            fd = os.open(self.blob_dir / name, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.ftruncate(fd, n)
                # Allocate the blocks now: a store into a mapped hole that the file system cannot
                # back (a full disk) is not an error but a SIGBUS that kills the server.
                os.posix_fallocate(fd, 0, n)
                mapped = mmap.mmap(fd, n, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
        if mapped is None:
            _overwrite(self.blob_dir / name, blob)
            return
        try:
            mapped[:] = blob
        except BaseException:
            _close_map(mapped)
            raise
        with self._pool_lock:
            self._maps[name] = mapped

    def view(self, staged: StagedBlob) -> memoryview | None:
        """The staged blob as a view of its slot's kept shared mapping (``None``: it has none).

        Writable, and it stays valid as long as it is referenced, even past :meth:`close`; its bytes
        stay the blob's until the slot is freed (:meth:`clear_pending`, :meth:`discard`) and reused.
        """
        with self._pool_lock:
            mapped = self._maps.get(staged.file)
        if mapped is None or len(mapped) != staged.bytes:
            return None
        return memoryview(mapped)

    def _unmap(self, names: list[str] | None = None) -> None:
        """Close the kept mappings of ``names`` (all of them: ``None``); the files stay."""
        with self._pool_lock:
            gone = list(self._maps) if names is None else [n for n in names if n in self._maps]
            maps = [self._maps.pop(n) for n in gone]
        for m in maps:
            _close_map(m)

    def discard(self, staged: StagedBlob) -> None:
        """Return the slot of a staged blob that was never recorded (or whose row is gone)."""
        with self._lock:
            row = self._db.execute("SELECT 1 FROM pending_updates WHERE file = ?", (staged.file,)).fetchone()
        if row is None:
            self._release_slots([staged.file])

    def drop_free_slots(self) -> None:
        """Delete the files of the free pool (the run is over; live rows keep theirs)."""
        with self._pool_lock:
            free, self._free = self._free, []
        self._unmap(free)
        for name in free:
            (self.blob_dir / name).unlink(missing_ok=True)

    def _take_slot(self) -> str:
        with self._pool_lock:
            if self._free:
                return self._free.pop()
            self._next_slot += 1
            return f"slot-{self._next_slot:06d}.bin"

    def _release_slots(self, names: list[str]) -> None:
        with self._pool_lock:
            self._free.extend(names)

    def _init_pool(self) -> None:
        """Slots named by no row are free; other files no row names (temporary files) are removed."""
        with self._lock:
            live = {str(r[0]) for r in self._db.execute("SELECT file FROM pending_updates")}
        for f in sorted(self.blob_dir.iterdir()):
            if f.name in live:
                pass
            elif _SLOT.fullmatch(f.name):
                self._free.append(f.name)
            else:  # not a slot, and never recorded
                f.unlink(missing_ok=True)
        numbers = [int(m.group(1)) for n in [*live, *self._free] if (m := _SLOT.fullmatch(n))]
        self._next_slot = max(numbers, default=0)

    def record_pending(self, staged: StagedBlob, client: str, meta_json: str, detail: str) -> None:
        """Record a staged update and its ``accepted`` audit row in one transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO pending_updates VALUES (?, ?, ?, ?, ?, ?)",
                    (staged.round, staged.client_id, meta_json, staged.file, staged.checksum, staged.bytes),
                )
                self._audit_locked(staged.round, staged.client_id, client, "accepted", staged.bytes, detail)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def add_pending(
        self, round: int, client_id: int, client: str, meta_json: str, blob: bytes, detail: str
    ) -> None:
        """:meth:`stage` and :meth:`record_pending` in one call."""
        staged = self.stage(round, client_id, blob)
        try:
            self.record_pending(staged, client, meta_json, detail)
        except BaseException:
            self.discard(staged)
            raise

    def pending(self, round: int) -> list[PendingUpdate]:
        """The intact pending updates of ``round``, by client id; see :meth:`lost_pending`."""
        return [p for p in self._read_pending(round) if isinstance(p, PendingUpdate)]

    def lost_pending(self, round: int) -> list[int]:
        """Clients of ``round`` whose recorded blob is missing or corrupt (only after an OS crash)."""
        return [p for p in self._read_pending(round) if isinstance(p, int)]

    def _read_pending(self, round: int) -> list[PendingUpdate | int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT client_id, meta_json, file, checksum FROM pending_updates WHERE round = ? "
                "ORDER BY client_id",
                (round,),
            ).fetchall()
        out: list[PendingUpdate | int] = []
        for cid, meta, name, recorded in rows:
            try:
                blob = (self.blob_dir / str(name)).read_bytes()
            except FileNotFoundError:
                blob = b""
            if blob and _matches(blob, str(recorded)):
                out.append(PendingUpdate(int(cid), str(meta), blob))
            else:
                out.append(int(cid))
        return out

    def drop_pending(self, round: int, client_id: int) -> None:
        """Forget one pending update (rejected when restored); its slot returns to the pool."""
        with self._lock:
            freed = [
                str(r[0])
                for r in self._db.execute(
                    "SELECT file FROM pending_updates WHERE round = ? AND client_id = ?", (round, client_id)
                )
            ]
            self._db.execute(
                "DELETE FROM pending_updates WHERE round = ? AND client_id = ?", (round, client_id)
            )
        self._release_slots(freed)

    def drop_pending_after(self, round: int) -> None:
        """Forget the pending updates of rounds after ``round`` (a rollback); their slots return to the pool."""
        with self._lock:
            freed = [
                str(r[0])
                for r in self._db.execute("SELECT file FROM pending_updates WHERE round > ?", (round,))
            ]
            self._db.execute("DELETE FROM pending_updates WHERE round > ?", (round,))
        self._release_slots(freed)

    def drop_lost_pending(self, round: int, client_ids: list[int]) -> None:
        """Forget the pending updates of ``client_ids`` in ``round`` (lost blobs, see
        :meth:`lost_pending`), with a ``pending_lost`` audit row each; their slots return to the pool.
        The clients can then upload again."""
        with self._lock:
            freed = []
            for cid in client_ids:
                row = self._db.execute(
                    "SELECT file FROM pending_updates WHERE round = ? AND client_id = ?", (round, cid)
                ).fetchone()
                if row is None:
                    continue
                freed.append(str(row[0]))
                self._db.execute(
                    "DELETE FROM pending_updates WHERE round = ? AND client_id = ?", (round, cid)
                )
                known = self._db.execute("SELECT name FROM clients WHERE client_id = ?", (cid,)).fetchone()
                name = "" if known is None else str(known[0])
                self._audit_locked(
                    round, cid, name, "pending_lost", 0, "blob missing or corrupt; asked again"
                )
        self._unmap(freed)
        self._release_slots(freed)

    def clear_pending(self, up_to_round: int) -> None:
        """Forget the pending updates of rounds <= ``up_to_round``; their slots return to the pool."""
        with self._lock:
            freed = [
                str(r[0])
                for r in self._db.execute("SELECT file FROM pending_updates WHERE round <= ?", (up_to_round,))
            ]
            self._db.execute("DELETE FROM pending_updates WHERE round <= ?", (up_to_round,))
        self._release_slots(freed)

    def record_cohort(self, round: int, clients: list[int]) -> None:
        """Record ``round``'s cohort (the latest attempt's): a resumed round reuses it (:meth:`cohort`)."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO cohorts VALUES (?, ?)", (round, json.dumps(sorted(clients)))
            )

    def cohort(self, round: int) -> list[int] | None:
        """The cohort recorded for ``round`` (``None``: none yet)."""
        with self._lock:
            row = self._db.execute("SELECT clients FROM cohorts WHERE round = ?", (round,)).fetchone()
        return None if row is None else [int(c) for c in json.loads(str(row[0]))]

    def was_accepted(self, round: int, client_id: int) -> bool:
        """Whether an update of ``client_id`` for ``round`` was accepted (its ``accepted`` audit row)."""
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM audit WHERE event = 'accepted' AND round = ? AND client_id = ? LIMIT 1",
                (round, client_id),
            ).fetchone()
        return row is not None

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


_SLOT = re.compile(r"slot-(\d+)\.bin")


def blob_checksum(blob: bytes | memoryview) -> str:
    """The checksum recorded with a pending blob: ``"xxh3:<16 hex digits>"`` (see the module Notes)."""
    return f"xxh3:{fingerprint(blob):016x}"


def _matches(blob: bytes, recorded: str) -> bool:
    return blob_checksum(blob) == recorded


def _close_map(m: mmap.mmap) -> None:
    """Close ``m`` now, or, while views of it live on (decoded tensors, see :meth:`NetState.view`),
    when the last of them goes."""
    with contextlib.suppress(BufferError):
        m.close()


def _overwrite(path: Path, blob: bytes | memoryview) -> None:
    """Make ``path`` hold exactly ``blob``, writing in place over a reused file's cached pages."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        view, done = memoryview(blob), 0
        while done < len(blob):
            done += os.pwrite(fd, view[done:], done)
        if os.fstat(fd).st_size != len(blob):
            os.ftruncate(fd, len(blob))
    finally:
        os.close(fd)
