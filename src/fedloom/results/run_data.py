"""What ``fedloom report`` reads from a run directory, simulated or deployed, finished or running.

A *simulation* run directory (``fedloom simulate``) holds ``config.toml``,
``metrics.jsonl``, ``events.jsonl`` and ``state.sqlite``; a *deployment* state directory
(``fedloom server --state-dir``) holds ``metrics.jsonl`` and ``state.sqlite`` (with the
configuration in its ``meta`` table and the server's audit log), and ``events.jsonl``
where the server writes one. :func:`load_run` reads them all, never writing:

* ``metrics.jsonl``: one row per committed round. A last line without its newline is a
  row still being written and is skipped; any other malformed line is an error naming
  file and line.
* ``events.jsonl`` (:func:`fedloom.engine.events.read_events`, torn last line skipped):
  when present, the source of each round's participation (selected, accepted, rejected
  and dropped clients with the reasons), bytes on the wire and privacy spent.
* ``state.sqlite``, opened read-only (a live server's database in WAL mode is read as of
  its last commit; a locked or unreadable database is skipped): the configuration when
  there is no ``config.toml``, the run's status, and -- without events -- the deployed
  server's audit log (cohorts, accepted updates with their bytes, rejections, dropouts
  and failures with their reasons).

Without either, participation falls back to the counts in the metrics rows
(``num_clients``, ``num_failed``, ``num_dropouts``), without reasons.
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedloom.core.errors import FedloomError, RunStateError
from fedloom.engine.events import (
    EVENTS,
    BytesMoved,
    ClientAccepted,
    ClientDropped,
    ClientRejected,
    ClientsSelected,
    EpsilonSpent,
    Event,
    RoundOpened,
    RunStarted,
    read_events,
)

__all__ = ["RoundActivity", "RunData", "load_run", "read_metrics_rows"]

STATE_DB = "state.sqlite"
_MAX_PROBLEMS_SHOWN = 5
# audit events of the deployed server that refuse an update, and those that drop a client
_REFUSED = ("rejected", "late", "secagg_refused", "failed")
_DROPPED = ("dropout",)


@dataclass
class RoundActivity:
    """One round's participation: who was selected, accepted, rejected or dropped (with reasons), and bytes.

    ``bytes_down`` / ``bytes_up`` are ``None`` where the run recorded none.
    """

    round: int
    selected: list[str] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)
    bytes_down: int | None = None
    bytes_up: int | None = None


@dataclass(frozen=True)
class RunData:
    """A run as read by :func:`load_run`.

    ``kind`` is ``"simulation"`` or ``"deployment"``; ``status`` the run's status in its
    database (``running``, ``completed``, ``failed``; ``""`` unknown); ``activity`` one
    entry per round with any participation recorded; ``activity_source`` where it came from
    (``"events"``, ``"audit"`` or ``"metrics"``); ``epsilon`` (round, epsilon) pairs and
    ``budget`` the privacy budget (0: none).
    """

    run_dir: Path
    kind: str
    config: Mapping[str, Any]
    rows: Sequence[Mapping[str, Any]]
    status: str
    events: list[Event] | None
    activity: list[RoundActivity]
    activity_source: str
    epsilon: list[tuple[int, float]]
    budget: float


def _missing(path: Path) -> RunStateError:
    return RunStateError(
        f"{path} not found: {path.parent} is not a complete run directory; "
        "pass a directory written by `fedloom simulate` or a `fedloom server --state-dir`"
    )


@contextlib.contextmanager
def _read_only(db: Path) -> Iterator[sqlite3.Connection | None]:
    """A read-only connection to ``db`` (``None`` when there is none or it cannot be opened)."""
    if not db.is_file():
        yield None
        return
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2.0)
    except sqlite3.Error:
        yield None
        return
    try:
        yield con
    finally:
        con.close()


def _query(con: sqlite3.Connection | None, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """The rows of ``sql``; none when the table is missing, the database locked or damaged."""
    if con is None:
        return []
    try:
        return list(con.execute(sql, tuple(args)).fetchall())
    except sqlite3.Error:
        return []


def _meta(con: sqlite3.Connection | None, key: str) -> str | None:
    rows = _query(con, "SELECT value FROM meta WHERE key = ?", (key,))
    return str(rows[0][0]) if rows else None


RowCheck = Callable[[Mapping[str, Any]], list[str]]


def read_metrics_rows(path: Path, check: RowCheck | None = None) -> list[dict[str, Any]]:
    """The JSON objects of ``metrics.jsonl``; a last line without its newline (being written) is skipped.

    Raises :class:`RunStateError` naming the file and line of any other line that is not a JSON
    object, or whose object ``check`` finds problems with (all problems, up to five shown).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _missing(path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunStateError(f"cannot read {path}: {exc}") from exc
    lines = text.splitlines()
    torn = bool(text) and not text.endswith("\n")
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row: object = json.loads(line)
        except json.JSONDecodeError as exc:
            if torn and lineno == len(lines):
                break  # a row still being written
            problems.append(f"{path}:{lineno}: not valid JSON ({exc.msg})")
            continue
        if not isinstance(row, dict):
            problems.append(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            continue
        found = check(row) if check is not None else []
        problems += [f"{path}:{lineno}: {p}" for p in found]
        if not found:
            rows.append(row)
    if problems:
        shown = problems[:_MAX_PROBLEMS_SHOWN]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more")
        raise RunStateError(
            "malformed metrics file (fix or delete the bad lines, e.g. a line cut short by a crash):\n"
            + "\n".join(f"  - {p}" for p in shown)
        )
    return rows


def _config(run_dir: Path, con: sqlite3.Connection | None) -> dict[str, Any]:
    path = run_dir / "config.toml"
    text: str | None
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = _meta(con, "config")
        if text is None:
            raise _missing(path) from None
        path = run_dir / STATE_DB
    except OSError as exc:
        raise RunStateError(f"cannot read {path}: {exc}; restore or regenerate the file") from exc
    try:
        return dict(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise RunStateError(f"cannot read {path}: {exc}; restore or regenerate the file") from exc


def _get(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _client_names(config: Mapping[str, Any]) -> list[str]:
    names = _get(config, "deploy.clients")
    return [str(n) for n in names] if isinstance(names, list) else []


def _from_events(events: Sequence[Event]) -> tuple[list[RoundActivity], list[tuple[int, float]], float]:
    """Participation, bytes and privacy by round; a round run again (after a resume) keeps its last run."""
    by_round: dict[int, RoundActivity] = {}
    epsilon: dict[int, float] = {}
    budget = 0.0
    for e in events:
        if isinstance(e, RoundOpened):
            by_round[e.round] = RoundActivity(e.round)
            continue
        act = by_round.setdefault(e.round, RoundActivity(e.round))
        if isinstance(e, ClientsSelected):
            act.selected = list(e.clients)
        elif isinstance(e, ClientAccepted):
            act.accepted.append(e.client)
            if e.bytes:
                act.bytes_up = (act.bytes_up or 0) + e.bytes
        elif isinstance(e, ClientRejected):
            act.rejected.append((e.client, e.reason))
        elif isinstance(e, ClientDropped):
            act.dropped.append((e.client, e.reason))
        elif isinstance(e, BytesMoved) and (e.down or e.up):  # a simulation without a codec moves none
            act.bytes_down, act.bytes_up = e.down, e.up
        elif isinstance(e, EpsilonSpent):
            epsilon[e.round] = e.epsilon
            budget = e.budget or budget
    return [by_round[r] for r in sorted(by_round)], sorted(epsilon.items()), budget


def _from_audit(con: sqlite3.Connection | None, names: Sequence[str]) -> list[RoundActivity]:
    """Participation from a deployed server's audit log and cohorts (empty: no such tables)."""
    by_round: dict[int, RoundActivity] = {}
    for r, clients in _query(con, "SELECT round, clients FROM cohorts ORDER BY round"):
        try:
            ids = [int(c) for c in json.loads(str(clients))]
        except (ValueError, TypeError):
            continue
        act = by_round.setdefault(int(r), RoundActivity(int(r)))
        act.selected = [names[c] if 0 <= c < len(names) else str(c) for c in ids]
    sql = "SELECT round, client, event, bytes, detail FROM audit ORDER BY seq"
    for r, client, event, nbytes, detail in _query(con, sql):
        if int(r) <= 0:
            continue
        act = by_round.setdefault(int(r), RoundActivity(int(r)))
        if event == "round_aborted":  # the attempt's answers are void; the next attempt's count
            act.accepted, act.rejected, act.dropped, act.bytes_up = [], [], [], None
        elif event == "accepted":
            act.accepted.append(str(client))
            act.bytes_up = (act.bytes_up or 0) + int(nbytes)
        elif event in _REFUSED:
            act.rejected.append((str(client), f"{event}: {detail}"))
        elif event in _DROPPED:
            act.dropped.append((str(client), f"no answer by the deadline ({detail})"))
    return [by_round[r] for r in sorted(by_round)]


def _from_metrics(rows: Sequence[Mapping[str, Any]]) -> list[RoundActivity]:
    """Counts only: ``num_failed`` rejections and ``num_dropouts`` dropouts, without names or reasons."""
    out = []
    for row in rows:
        act = RoundActivity(int(row.get("round", 0)))
        act.rejected = [("?", "not recorded")] * int(_finite(row.get("num_failed")) or 0)
        act.dropped = [("?", "not recorded")] * int(_finite(row.get("num_dropouts")) or 0)
        out.append(act)
    return out


def _finite(v: object) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def load_run(run_dir: Path, *, check_row: RowCheck | None = None) -> RunData:
    """Read ``run_dir`` (see the module docstring); raises :class:`RunStateError` when it holds no run.

    ``check_row`` validates each metrics row (see :func:`read_metrics_rows`).
    """
    if not run_dir.is_dir():
        raise RunStateError(
            f"run directory {run_dir} does not exist or is not a directory; "
            "pass a directory written by `fedloom simulate` or a `fedloom server --state-dir`"
        )
    with _read_only(run_dir / STATE_DB) as con:
        config = _config(run_dir, con)
        rows = read_metrics_rows(run_dir / "metrics.jsonl", check_row)
        status = _meta(con, "status") or ""
        deployed = not (run_dir / "config.toml").exists()
        events: list[Event] | None = None
        if (run_dir / EVENTS).exists():
            try:
                events = list(read_events(run_dir / EVENTS))
            except FedloomError as exc:
                raise RunStateError(f"cannot read {run_dir / EVENTS}: {exc}") from exc
            started = [e for e in events if isinstance(e, RunStarted)]
            if started:
                deployed = started[-1].runtime == "deployment"
        epsilon = [(int(r["round"]), float(e)) for r in rows if (e := _finite(r.get("epsilon"))) is not None]
        budget = _finite(_get(config, "privacy.budget_epsilon")) or _finite(
            _get(config, "privacy.target_epsilon")
        )
        if events:
            activity, ev_eps, ev_budget = _from_events(events)
            epsilon, budget, source = ev_eps or epsilon, ev_budget or budget, "events"
        else:
            activity, source = _from_audit(con, _client_names(config)), "audit"
            if not activity:
                activity, source = _from_metrics(rows), "metrics"
    return RunData(
        run_dir=run_dir,
        kind="deployment" if deployed else "simulation",
        config=config,
        rows=rows,
        status=status,
        events=events,
        activity=activity,
        activity_source=source,
        epsilon=epsilon,
        budget=budget or 0.0,
    )
