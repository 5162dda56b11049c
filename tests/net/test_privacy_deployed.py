"""Central DP in deployment: the same DP stage and ledger as the simulation, over real processes."""

from __future__ import annotations

import json
from pathlib import Path

from tests.net.helpers import HOSPITALS, client, free_port, server, write_config

from fedloom.config import load_config
from fedloom.privacy.accounting import FixedSizeSampling, epsilon

DP = """
[privacy]
mode = "central"
clip_norm = 1.0
noise_multiplier = 1.5
"""


def test_deployed_dp_reports_epsilon_and_stops_at_the_budget(heart_dir: Path, tmp_path: Path) -> None:
    # Cohort 3 of 4 (sampling 0.75): epsilon after r rounds from the accountant directly.
    eps = [epsilon(1.5, FixedSizeSampling(3, 4), r, 1e-5) for r in (1, 2, 3)]
    budget = (eps[1] + eps[2]) / 2  # room for exactly two rounds
    extra = DP + f"budget_epsilon = {budget}\n"
    cfg_path = write_config(tmp_path / "exp.toml", extra)
    text = cfg_path.read_text()
    text = text.replace('name = "scaffold"', 'name = "fedavg"').replace(
        "fraction = 1.0\nmin_clients = 4", "fraction = 0.75\nmin_clients = 3"
    )
    text = text.replace("min_quorum = 4", "min_quorum = 3")
    cfg_path.write_text(text)
    cfg = load_config(cfg_path)
    assert (cfg.privacy.mode, cfg.rounds) == ("central", 4)
    port = free_port()
    srv = server(tmp_path, cfg_path, port)
    clients = [client(tmp_path, h, port) for h in HOSPITALS]
    try:
        assert srv.wait(180) == 0, srv.err.read_text()[-3000:]
    finally:
        for p in [srv, *clients]:
            p.stop()
    rows = [json.loads(x) for x in (tmp_path / "srv" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert [r["epsilon"] for r in rows] == [eps[0], eps[1]]
    assert srv.events("privacy_budget_reached")
