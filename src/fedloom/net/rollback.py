"""``fedloom rollback``: make a kept checkpoint of a deployed run the one its server resumes from.

The server never commits a model that is not usable (see :mod:`fedloom.net.guard`), but a model
can be finite and still bad (a poisoned round that no check caught). With the server stopped,
:func:`roll_back` makes the kept checkpoint of an earlier round (``checkpoint.keep`` of them are
kept) the latest: later checkpoints, metrics and pending updates are deleted, ``metrics.jsonl``
is rewritten to match, the final model file of a completed run is removed, and an audit row
``rollback`` records it. The next ``fedloom server`` on the state directory resumes from there.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedloom.core.errors import RunStateError
from fedloom.net.state import NetState
from fedloom.results.store import RunStore

__all__ = ["roll_back"]

_STATE_DB = "state.sqlite"  # the names fedloom.net.server gives these files (it needs grpc; this does not)
_METRICS = "metrics.jsonl"
_MODEL = "model.safetensors"


def roll_back(state_dir: Path, round: int) -> list[int]:
    """Make round ``round``'s kept checkpoint in ``state_dir`` the latest; returns the rounds given up.

    Raises :class:`RunStateError` if the directory holds no run or keeps no checkpoint of ``round``.
    """
    db = state_dir / _STATE_DB
    if not db.is_file():
        raise RunStateError(f"{state_dir} holds no server state ({_STATE_DB} is missing)")
    with RunStore(db) as store, NetState(db) as net:
        dropped = [r for r in store.rounds() if r > round]
        store.roll_back(round)
        net.drop_pending_after(round)
        history = [m for m in store.metrics(up_to=round) if m.get("round", 0) > 0]
        (state_dir / _METRICS).write_text("".join(json.dumps(m) + "\n" for m in history), encoding="utf-8")
        (state_dir / _MODEL).unlink(missing_ok=True)
        store.set_meta("status", "rolled_back")
        net.audit(round, -1, "", "rollback", 0, json.dumps({"to_round": round, "dropped": dropped}))
    return dropped
