from __future__ import annotations

import io

from rich.console import Console

from fedloom.cli.progress import ConsoleListener
from fedloom.sim.executor import ClientFailure

ROUND = {
    "round": 3,
    "train_loss": 0.25,
    "num_clients": 10,
    "seconds": 0.5,
    "test_accuracy": 0.9,
    "test_loss": 0.3,
}


def test_plain_log_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    listener = ConsoleListener(Console(file=out, force_terminal=False, width=200))
    listener.on_start(1, 10, {"data": "d", "run_dir": "r"})
    listener.on_round(ROUND)
    listener.on_failure(ClientFailure(4, "boom"), 3)
    listener.close()
    text = out.getvalue()
    assert "round 3  train_loss 0.2500  test_acc 0.9000  test_loss 0.3000  clients 10  0.50s" in text
    assert "client 4 failed: boom" in text


def test_progress_bar_with_eta_on_a_terminal() -> None:
    out = io.StringIO()
    listener = ConsoleListener(Console(file=out, force_terminal=True, width=200))
    listener.on_start(1, 10, {"data": "d", "run_dir": "r"})
    listener.on_round(ROUND)
    listener.close()
    text = out.getvalue()
    assert "round 3/10" in text
    assert "acc 0.9000" in text
    assert "ETA" in text


def test_failure_reasons_and_data_names_keep_their_brackets() -> None:
    # A markup-enabled console: what the listener prints must still not be read as style tags.
    out = io.StringIO()
    listener = ConsoleListener(Console(file=out, force_terminal=False, width=300))
    listener.on_start(1, 10, {"data": "loader [client] of /data/[site]", "run_dir": "runs/[a]:fire:"})
    listener.on_failure(ClientFailure(4, "needs [client] and pip install 'fedloom[net]'"), 3)
    listener.close()
    text = out.getvalue()
    assert "data: loader [client] of /data/[site]  run: runs/[a]:fire:" in text
    assert "round 3: client 4 failed: needs [client] and pip install 'fedloom[net]'" in text
