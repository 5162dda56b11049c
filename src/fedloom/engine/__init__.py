"""The round engine (:mod:`fedloom.engine.rounds`), its typed events and the observers that consume them.

Modules::

    events      the typed events, the event bus, the events.jsonl log
    rounds      the round engine and the Driver protocol a runtime implements
    resume      opening a run directory (new or resumed) and closing it
    evaluation  the evaluation stage (central, per-site, federated)
    commit      committers (inline, threaded) and the event sequencer
"""

from fedloom.engine.events import (
    Aggregated,
    BytesMoved,
    ClientAccepted,
    ClientDropped,
    ClientRejected,
    ClientsSelected,
    EpsilonSpent,
    Evaluated,
    Event,
    EventBus,
    EventLog,
    Observer,
    RoundCommitted,
    RoundOpened,
    RunStarted,
    RunStopped,
    comparable,
    event_from_json,
    event_to_json,
    jsonable,
    read_events,
    without_timing,
)

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
