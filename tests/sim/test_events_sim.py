"""A simulated run's event stream agrees with its metrics file, cohort draw and per-site evaluation."""

from __future__ import annotations

import json
from pathlib import Path

from fedloom.config import load_config
from fedloom.engine import (
    Aggregated,
    ClientAccepted,
    ClientsSelected,
    Evaluated,
    Event,
    RoundCommitted,
    RunStarted,
    RunStopped,
    jsonable,
    read_events,
)
from fedloom.sim.runner import run_simulation
from fedloom.sim.sampling import draw_cohort

HOSPITALS = ("cleveland", "hungarian", "switzerland", "va")


def test_events_match_the_metrics_and_the_cohort(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "data.dataset=heart_disease",
            "data.num_clients=4",
            "rounds=2",
            "sampling.fraction=0.5",
            "executor=sequential",
            "seed=3",
        ],
    )
    seen: list[Event] = []
    run_simulation(cfg, tmp_path / "run", observers=[seen.append])
    events = list(read_events(tmp_path / "run" / "events.jsonl"))
    assert events == seen
    assert isinstance(events[0], RunStarted)
    assert events[0].round == 1
    assert not events[0].resumed
    assert isinstance(events[-1], RunStopped)
    assert events[-1].reason == "round budget reached"
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e.metrics for e in events if isinstance(e, RoundCommitted)] == jsonable(rows)
    for r, row in enumerate(rows, start=1):
        this = [e for e in events if e.round == r and not isinstance(e, RunStarted | RunStopped)]
        cohort = draw_cohort(
            cfg.seed, r, 4, scheme="fixed", fraction=0.5, min_clients=cfg.sampling.min_clients
        )
        (selected,) = [e for e in this if isinstance(e, ClientsSelected)]
        assert selected.clients == tuple(HOSPITALS[int(c)] for c in cohort)
        accepted = [e for e in this if isinstance(e, ClientAccepted)]
        assert sorted(e.client for e in accepted) == sorted(selected.clients)
        (agg,) = [e for e in this if isinstance(e, Aggregated)]
        assert agg.examples == sum(e.examples for e in accepted) == row["num_examples"]
        sites = {e.site: e for e in this if isinstance(e, Evaluated) and e.scope == "site"}
        assert set(sites) == set(HOSPITALS)
        for h in HOSPITALS:
            assert sites[h].metrics["accuracy"] == row["sites"][h]["accuracy"]
            assert sites[h].examples == row["sites"][h]["num_examples"]
    # Resuming to extend the run appends to the same stream.
    more = load_config(
        None,
        [
            "data.dataset=heart_disease",
            "data.num_clients=4",
            "rounds=3",
            "sampling.fraction=0.5",
            "executor=sequential",
            "seed=3",
        ],
    )
    run_simulation(more, tmp_path / "run", resume=True)
    events = list(read_events(tmp_path / "run" / "events.jsonl"))
    starts = [e for e in events if isinstance(e, RunStarted)]
    assert [(s.round, s.resumed) for s in starts] == [(1, False), (3, True)]
    assert [e.round for e in events if isinstance(e, RoundCommitted)] == [1, 2, 3]
