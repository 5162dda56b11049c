"""Typed events of a federated run, and the bus that hands them to observers.

A run (simulated or deployed) emits one stream of events: the run started, a
round opened, clients were selected, each client's update was accepted or
rejected (with the reason) or the client dropped out, the round aggregated,
the model was evaluated (centrally, per site, or federated), privacy budget was
spent, bytes moved, the round committed, the run stopped. Every observer (the
``events.jsonl`` log, trackers, the live dashboard, ``fedloom report``) reads
this one stream, so they agree with each other and with the state database.

Events are frozen dataclasses. ``time`` (seconds since the epoch), and in a round's
metrics ``seconds`` and ``max_client_compute_s``, are timing fields: :func:`without_timing`
drops them so two runs of the same experiment can be compared event for event.

Runtime-specific fields say how a runtime moved the round rather than what the round
computed; :func:`comparable` drops them too, so a simulated and a deployed run of the
same experiment compare equal event for event:

* ``runtime`` and ``info`` of ``run_started`` (which runtime; its data source, or its
  client registry and run id);
* ``bytes`` of ``client_accepted`` and ``down``/``up`` of ``bytes_moved``: bytes on the
  wire (a simulation moves none, and reports 0);
* in a round's metrics, the runtime's own bookkeeping (:data:`RUNTIME_METRICS`): the
  deployment's ``attempt``, ``num_dropouts``, ``dp_amplification`` (with its reason) and
  ``secagg_error_bound``; the simulated secure sum's ``secagg_bytes_up`` and
  ``secagg_dropouts``.
"""

from __future__ import annotations

import json
import math
import time as _time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Any, ClassVar

from fedloom.core.errors import FedloomError

__all__ = [
    "Aggregated",
    "BytesMoved",
    "ClientAccepted",
    "ClientDropped",
    "ClientRejected",
    "ClientsSelected",
    "EpsilonSpent",
    "Evaluated",
    "Event",
    "EventBus",
    "EventLog",
    "Observer",
    "RoundCommitted",
    "RoundOpened",
    "RunStarted",
    "RunStopped",
    "comparable",
    "event_from_json",
    "event_to_json",
    "jsonable",
    "read_events",
    "without_timing",
]

EVENTS = "events.jsonl"
TIMING_FIELDS = frozenset({"time", "seconds", "max_client_compute_s"})
#: Event fields that depend on the runtime (see the module docstring).
RUNTIME_FIELDS = frozenset({"runtime", "info", "bytes", "down", "up"})
#: Metrics keys of a round that depend on the runtime (see the module docstring).
RUNTIME_METRICS = frozenset(
    {
        "attempt",
        "num_dropouts",
        "dp_amplification",
        "dp_amplification_reason",
        "secagg_error_bound",
        "secagg_bytes_up",
        "secagg_dropouts",
    }
)


@dataclass(frozen=True, kw_only=True)
class Event:
    """Base of every event: the round it belongs to and when it happened."""

    kind: ClassVar[str] = "event"
    round: int
    time: float = field(default_factory=_time.time, compare=False)


@dataclass(frozen=True, kw_only=True)
class RunStarted(Event):
    """A run started or resumed; ``round`` is the first round it will run."""

    kind: ClassVar[str] = "run_started"
    rounds: int
    runtime: str  # "simulation" or "deployment"
    resumed: bool = False
    info: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class RoundOpened(Event):
    kind: ClassVar[str] = "round_opened"


@dataclass(frozen=True, kw_only=True)
class ClientsSelected(Event):
    """The round's cohort, by client name, in selection order."""

    kind: ClassVar[str] = "clients_selected"
    clients: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class ClientAccepted(Event):
    """A client's update passed validation and enters the aggregate."""

    kind: ClassVar[str] = "client_accepted"
    client: str
    examples: int
    bytes: int = 0


@dataclass(frozen=True, kw_only=True)
class ClientRejected(Event):
    """A client's update was refused; ``reason`` says why (non-finite, too large, stale, ...)."""

    kind: ClassVar[str] = "client_rejected"
    client: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class ClientDropped(Event):
    """A selected client sent nothing usable in time (crashed, timed out, left)."""

    kind: ClassVar[str] = "client_dropped"
    client: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class Aggregated(Event):
    kind: ClassVar[str] = "aggregated"
    clients: int
    examples: int


@dataclass(frozen=True, kw_only=True)
class Evaluated(Event):
    """An evaluation of the global model.

    ``scope`` is ``"central"`` (the server's test set), ``"site"`` (one site's own
    test split; ``site`` names it), ``"sites"`` (the aggregate over sites) or
    ``"federated"`` (sampled clients' training data).
    """

    kind: ClassVar[str] = "evaluated"
    scope: str
    metrics: Mapping[str, float | None]  # None: undefined (e.g. AUC on one class)
    site: str | None = None
    examples: int = 0


@dataclass(frozen=True, kw_only=True)
class EpsilonSpent(Event):
    """Privacy spent so far: (epsilon, delta)-DP after this round, and the budget (0: none)."""

    kind: ClassVar[str] = "epsilon_spent"
    epsilon: float
    delta: float
    budget: float = 0.0


@dataclass(frozen=True, kw_only=True)
class BytesMoved(Event):
    """Bytes on the wire this round: ``down`` (broadcast to clients) and ``up`` (updates)."""

    kind: ClassVar[str] = "bytes_moved"
    down: int
    up: int


@dataclass(frozen=True, kw_only=True)
class RoundCommitted(Event):
    """The round's state is durable; ``metrics`` is the round's metrics.jsonl row (non-finite as None)."""

    kind: ClassVar[str] = "round_committed"
    metrics: Mapping[str, Any]


@dataclass(frozen=True, kw_only=True)
class RunStopped(Event):
    """The run ended after ``round``; ``reason`` is its stop reason (or the error)."""

    kind: ClassVar[str] = "run_stopped"
    reason: str
    failed: bool = False


_KINDS: dict[str, type[Event]] = {
    cls.kind: cls
    for cls in (
        RunStarted,
        RoundOpened,
        ClientsSelected,
        ClientAccepted,
        ClientRejected,
        ClientDropped,
        Aggregated,
        Evaluated,
        EpsilonSpent,
        BytesMoved,
        RoundCommitted,
        RunStopped,
    )
}


def event_to_json(event: Event) -> dict[str, Any]:
    """The event as a JSON-ready dict with its ``type``; non-finite floats become ``None``."""
    out: dict[str, Any] = {"type": event.kind}
    for name in _field_names(type(event)):  # the fields hold plain values: no deep copy (asdict's)
        out[name] = jsonable(getattr(event, name))
    return out


_FIELDS: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type[Event]) -> tuple[str, ...]:
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = tuple(f.name for f in fields(cls))
    return names


def event_from_json(obj: Mapping[str, Any]) -> Event:
    """The event that :func:`event_to_json` wrote; unknown types or fields are refused."""
    kind = obj.get("type")
    cls = _KINDS.get(str(kind))
    if cls is None:
        raise FedloomError(f"unknown event type {kind!r} (known: {', '.join(sorted(_KINDS))})")
    names = {f.name for f in fields(cls)}
    extra = set(obj) - names - {"type"}
    if extra:
        raise FedloomError(f"event {kind!r} has unknown fields: {', '.join(sorted(extra))}")
    args = {k: v for k, v in obj.items() if k != "type"}
    if "clients" in args and isinstance(args["clients"], list):
        args["clients"] = tuple(args["clients"])
    try:
        return cls(**args)
    except TypeError as exc:
        raise FedloomError(f"event {kind!r} is malformed: {exc}") from None


def without_timing(event: Event | Mapping[str, Any]) -> dict[str, Any]:
    """The event's JSON form without timing fields (``time``, and ``seconds`` in metrics)."""
    obj = event_to_json(event) if isinstance(event, Event) else dict(event)
    out = {k: v for k, v in obj.items() if k not in TIMING_FIELDS}
    if isinstance(out.get("metrics"), Mapping):
        out["metrics"] = {k: v for k, v in out["metrics"].items() if k not in TIMING_FIELDS}
    return out


def comparable(event: Event | Mapping[str, Any]) -> dict[str, Any]:
    """:func:`without_timing`, also without the runtime-specific fields (see the module docstring)."""
    out = {k: v for k, v in without_timing(event).items() if k not in RUNTIME_FIELDS}
    if isinstance(out.get("metrics"), Mapping):
        out["metrics"] = {k: v for k, v in out["metrics"].items() if k not in RUNTIME_METRICS}
    return out


Observer = Callable[[Event], None]


class EventBus:
    """Hands each emitted event to every subscribed observer, in subscription order.

    An observer that raises is unsubscribed with its error logged by ``on_error``
    (default: re-raise): a broken dashboard must not stop training unless asked to.
    """

    def __init__(self, on_error: Callable[[Observer, Exception], None] | None = None) -> None:
        self._observers: list[Observer] = []
        self._on_error = on_error

    def subscribe(self, observer: Observer) -> None:
        self._observers.append(observer)

    def unsubscribe(self, observer: Observer) -> None:
        if observer in self._observers:
            self._observers.remove(observer)

    def emit(self, event: Event) -> None:
        for obs in list(self._observers):
            try:
                obs(event)
            except Exception as exc:
                if self._on_error is None:
                    raise
                self.unsubscribe(obs)
                self._on_error(obs, exc)


class EventLog:
    """An observer that appends each event as one JSON line to ``events.jsonl`` and flushes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] = path.open("a", encoding="utf-8")

    def __call__(self, event: Event) -> None:
        self._file.write(json.dumps(event_to_json(event)) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_events(path: Path) -> Iterator[Event]:
    """The events in an ``events.jsonl`` file; a torn last line (a run still writing) is skipped."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                return
            raise FedloomError(f"{path}:{i + 1}: not a JSON event line") from None
        if not isinstance(obj, dict):
            raise FedloomError(f"{path}:{i + 1}: an event line must be a JSON object")
        yield event_from_json(obj)


def jsonable(v: Any) -> Any:
    """``v`` with every non-finite float replaced by ``None`` (JSON has no NaN), tuples as lists."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, Mapping):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [jsonable(x) for x in v]
    return v
