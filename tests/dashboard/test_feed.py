"""Tailing a run's log files into SSE messages: complete lines only, resumable, metrics as a fallback."""

from __future__ import annotations

import json
from pathlib import Path

from fedloom.dashboard.feed import Feed, read_lines


def test_read_lines_returns_complete_lines_and_their_offsets(tmp_path: Path) -> None:
    f = tmp_path / "events.jsonl"
    assert read_lines(f, 0) == ([], 0)  # not there yet
    f.write_bytes(b'{"a": 1}\n{"b": 2}\n{"c":')
    assert read_lines(f, 0) == ([(9, '{"a": 1}'), (18, '{"b": 2}')], 18)
    assert read_lines(f, 18) == ([], 18)  # the torn line waits for its newline
    with f.open("ab") as out:
        out.write(b" 3}\n")
    assert read_lines(f, 18) == ([(27, '{"c": 3}')], 27)
    assert read_lines(f, 9, limit=12) == ([(18, '{"b": 2}')], 18)  # a chunk ends mid-line
    assert read_lines(f, 100) == ([], -1)  # shorter than the offset: the file was replaced


def test_feed_follows_events_and_resumes_from_the_last_event_id(tmp_path: Path) -> None:
    (tmp_path / "events.jsonl").write_text('{"type": "round_opened", "round": 1}\n', encoding="utf-8")
    feed = Feed(tmp_path)
    first = feed.poll()
    assert first == ['id: e37\ndata: {"type": "round_opened", "round": 1}\n\n']
    assert feed.poll() == []
    with (tmp_path / "events.jsonl").open("a", encoding="utf-8") as out:
        out.write('{"type": "round_opened", "round": 2}\n')
    assert feed.poll() == ['id: e74\ndata: {"type": "round_opened", "round": 2}\n\n']
    assert Feed(tmp_path, "e37").poll() == ['id: e74\ndata: {"type": "round_opened", "round": 2}\n\n']
    assert Feed(tmp_path, "garbage").poll()[0].startswith("id: e37\n")


def test_feed_serves_metrics_rows_until_an_event_log_appears(tmp_path: Path) -> None:
    row = '{"round": 1, "test_loss": NaN, "test_accuracy": 0.5}\n'
    (tmp_path / "metrics.jsonl").write_text(row, encoding="utf-8")
    feed = Feed(tmp_path)
    (message,) = feed.poll()
    head, data = message.split("\n")[:2]
    assert head == f"id: m{len(row)}"
    assert json.loads(data.removeprefix("data: ")) == {
        "type": "round_committed",
        "round": 1,
        "metrics": {"round": 1, "test_loss": None, "test_accuracy": 0.5},
    }
    (tmp_path / "events.jsonl").write_text('{"type": "round_opened", "round": 2}\n', encoding="utf-8")
    assert feed.poll() == [
        "event: reset\ndata: {}\n\n",
        'id: e37\ndata: {"type": "round_opened", "round": 2}\n\n',
    ]
