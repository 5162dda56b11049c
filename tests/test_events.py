"""The event stream's JSON form: every event type round-trips, and bad lines are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedloom.core.errors import FedloomError
from fedloom.engine import (
    Aggregated,
    BytesMoved,
    ClientAccepted,
    ClientDropped,
    ClientRejected,
    ClientsSelected,
    EpsilonSpent,
    Evaluated,
    EventBus,
    EventLog,
    RoundCommitted,
    RoundOpened,
    RunStarted,
    RunStopped,
    comparable,
    read_events,
    without_timing,
)

EVENTS = [
    RunStarted(round=1, rounds=3, runtime="simulation", info={"data": "mnist"}),
    RoundOpened(round=1),
    ClientsSelected(round=1, clients=("a", "b")),
    ClientAccepted(round=1, client="a", examples=10, bytes=400),
    ClientRejected(round=1, client="b", reason="non-finite update"),
    ClientDropped(round=1, client="c", reason="deadline"),
    Aggregated(round=1, clients=1, examples=10),
    Evaluated(round=1, scope="site", site="a", metrics={"accuracy": 0.5}, examples=4),
    EpsilonSpent(round=1, epsilon=0.25, delta=1e-5, budget=2.0),
    BytesMoved(round=1, down=800, up=400),
    RoundCommitted(round=1, metrics={"round": 1, "seconds": 0.1, "train_loss": 0.7}),
    RunStopped(round=1, reason="round budget reached"),
]


def test_every_event_round_trips_through_the_log(tmp_path: Path) -> None:
    bus = EventBus()
    log = EventLog(tmp_path / "events.jsonl")
    seen: list[object] = []
    bus.subscribe(log)
    bus.subscribe(seen.append)
    for e in EVENTS:
        bus.emit(e)
    log.close()
    back = list(read_events(tmp_path / "events.jsonl"))
    assert back == EVENTS == seen
    assert [e.time for e in back] == [e.time for e in EVENTS]
    assert without_timing(EVENTS[-2]) == {
        "type": "round_committed",
        "round": 1,
        "metrics": {"round": 1, "train_loss": 0.7},
    }


def test_comparable_drops_exactly_the_timing_and_runtime_specific_fields() -> None:
    assert comparable(EVENTS[0]) == {"type": "run_started", "round": 1, "rounds": 3, "resumed": False}
    assert comparable(EVENTS[3]) == {"type": "client_accepted", "round": 1, "client": "a", "examples": 10}
    assert comparable(EVENTS[9]) == {"type": "bytes_moved", "round": 1}
    row = {"round": 2, "attempt": 1, "num_dropouts": 0, "max_client_compute_s": 0.2, "test_loss": 0.5}
    assert comparable(RoundCommitted(round=2, metrics=row)) == {
        "type": "round_committed",
        "round": 2,
        "metrics": {"round": 2, "test_loss": 0.5},
    }
    # what a round computed is kept
    assert comparable(EVENTS[4]) == {
        "type": "client_rejected",
        "round": 1,
        "client": "b",
        "reason": "non-finite update",
    }
    assert comparable(EVENTS[8])["epsilon"] == 0.25


def test_the_sequencer_holds_later_events_until_the_commit_is_released() -> None:
    from fedloom.engine.commit import Sequencer

    seen: list[object] = []
    bus = EventBus()
    bus.subscribe(seen.append)
    seq = Sequencer(bus)
    seq.emit(RoundOpened(round=1))
    seq.hold()  # round 1 handed to the committer
    seq.emit(RoundOpened(round=2))
    seq.hold()  # round 2 handed over before round 1 is durable
    seq.emit(RoundOpened(round=3))
    assert [type(e).__name__ for e in seen] == ["RoundOpened"]
    seq.release(RoundCommitted(round=1, metrics={}))
    assert [(type(e).__name__, e.round) for e in seen] == [  # type: ignore[attr-defined]
        ("RoundOpened", 1),
        ("RoundCommitted", 1),
        ("RoundOpened", 2),
    ]
    seq.release(RoundCommitted(round=2, metrics={}))
    assert [(type(e).__name__, e.round) for e in seen][3:] == [  # type: ignore[attr-defined]
        ("RoundCommitted", 2),
        ("RoundOpened", 3),
    ]
    seq.emit(RunStopped(round=2, reason="x"))
    assert isinstance(seen[-1], RunStopped)


def test_a_torn_last_line_is_skipped_and_a_bad_line_is_named(tmp_path: Path) -> None:
    p = tmp_path / "events.jsonl"
    p.write_text(json.dumps({"type": "round_opened", "round": 2, "time": 1.0}) + '\n{"type": "rou')
    assert [e.round for e in read_events(p)] == [2]
    p.write_text('{"type": "teleported", "round": 1}\n')
    with pytest.raises(FedloomError, match="unknown event type 'teleported'"):
        list(read_events(p))
    p.write_text('{"type": "round_opened", "round": 1, "colour": "red"}\n')
    with pytest.raises(FedloomError, match="unknown fields: colour"):
        list(read_events(p))


def test_a_failing_observer_is_dropped_when_asked_and_raises_otherwise() -> None:
    errors: list[str] = []

    def broken(_: object) -> None:
        raise RuntimeError("dashboard gone")

    bus = EventBus(on_error=lambda obs, exc: errors.append(str(exc)))
    bus.subscribe(broken)
    bus.emit(RoundOpened(round=1))
    bus.emit(RoundOpened(round=2))
    assert errors == ["dashboard gone"]
    strict = EventBus()
    strict.subscribe(broken)
    with pytest.raises(RuntimeError):
        strict.emit(RoundOpened(round=1))


def test_a_rounds_closing_events_go_out_with_its_commit_and_survive_a_failed_one() -> None:
    from fedloom.engine.commit import Sequencer

    def run(fail: bool) -> list[tuple[str, int]]:
        seen: list[object] = []
        bus = EventBus()
        bus.subscribe(seen.append)
        seq = Sequencer(bus)
        seq.emit(RoundOpened(round=1))
        seq.hold([Aggregated(round=1, clients=2, examples=9), BytesMoved(round=1, down=1, up=2)])
        seq.emit(RoundOpened(round=2))  # the next round opened before round 1 is durable
        seq.hold([Aggregated(round=2, clients=1, examples=4)])
        seq.emit(RoundOpened(round=3))
        assert len(seen) == 1  # nothing of round 1's close before its commit is durable
        if fail:
            seq.drain()  # round 1's commit failed: everything comes out, still in round order
        else:
            seq.release(RoundCommitted(round=1, metrics={}))
            seq.release(RoundCommitted(round=2, metrics={}))
        return [(type(e).__name__, e.round) for e in seen]  # type: ignore[attr-defined]

    opened = [("RoundOpened", 1)]
    first = [("Aggregated", 1), ("BytesMoved", 1)]
    assert run(False) == [*opened, *first, ("RoundCommitted", 1), ("RoundOpened", 2), ("Aggregated", 2),
                          ("RoundCommitted", 2), ("RoundOpened", 3)]  # fmt: skip
    assert run(True) == [*opened, *first, ("RoundOpened", 2), ("Aggregated", 2), ("RoundOpened", 3)]


def test_a_commit_released_after_a_drain_still_goes_out() -> None:
    from fedloom.engine.commit import Sequencer

    seen: list[object] = []
    bus = EventBus()
    bus.subscribe(seen.append)
    seq = Sequencer(bus)
    seq.hold([Aggregated(round=1, clients=1, examples=1)])
    seq.drain()  # the run failed while round 1's commit was on its thread
    seq.release(RoundCommitted(round=1, metrics={}))  # which then finished
    seq.emit(RoundOpened(round=2))
    assert [type(e).__name__ for e in seen] == ["Aggregated", "RoundCommitted", "RoundOpened"]
