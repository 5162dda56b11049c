"""Opening a run's directory, new or resumed, and closing it: the same in every runtime.

A run directory holds ``state.sqlite`` (the :class:`~fedloom.results.store.RunStore`:
configuration, checkpoints, metrics), ``metrics.jsonl``, ``events.jsonl`` and, once
the run ends, ``model.safetensors``. A resumed run reloads the last checkpoint and
continues; because every random draw derives from (seed, round, client, purpose), it
ends with the same model, bit for bit, as an uninterrupted run.

A resume refuses a configuration that differs from the one the run was started with,
naming the keys (``extendable`` lists keys that may change), and a directory whose run
artefacts have no run in the database (see :func:`~fedloom.results.store.orphan_artefacts`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedloom.algorithms.api import ClientState, ServerState
from fedloom.config.loader import config_differences, config_to_toml
from fedloom.config.schema import ExperimentConfig
from fedloom.core.errors import RunStateError
from fedloom.core.serde import params_to_bytes
from fedloom.results.store import RunStore, orphan_artefacts

__all__ = [
    "CONFIG",
    "METRICS",
    "MODEL",
    "STATE_DB",
    "OpenRun",
    "finish_run",
    "open_run",
    "write_atomically",
]

STATE_DB = "state.sqlite"
METRICS = "metrics.jsonl"
CONFIG = "config.toml"
MODEL = "model.safetensors"


@dataclass
class OpenRun:
    """A run directory ready for its next round: the store (open), the state and what came before."""

    store: RunStore
    state: ServerState
    client_states: dict[int, ClientState]
    history: list[dict[str, Any]]  # committed rounds' metrics rows (round >= 1)
    resumed: bool

    @property
    def last(self) -> Mapping[str, Any]:
        return self.history[-1] if self.history else {}


def open_run(
    cfg: ExperimentConfig,
    run_dir: Path,
    init: Callable[[], ServerState],
    *,
    resume: bool | None,
    extendable: Collection[str] = (),
    option: str = "--out",
) -> OpenRun:
    """Open ``run_dir`` for ``cfg``: a new run (``resume=False``), the run it holds (``True``), or
    whichever it holds (``None``). ``init`` makes a new run's round-0 state; ``option`` names the
    command-line option that chose the directory (in messages). The caller closes ``.store``.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    db = run_dir / STATE_DB
    if resume is False and db.exists():
        raise RunStateError(
            f"{run_dir} already holds a run; resume it with --resume {run_dir} or pick another {option}"
        )
    orphans = orphan_artefacts(run_dir, db)
    if orphans:
        raise RunStateError(
            f"{run_dir} holds run artefacts ({', '.join(orphans)}) but {db} holds no run (missing, "
            f"empty, or copied without its -wal file); restore the database, or use another {option}"
        )
    toml = config_to_toml(cfg)
    store = RunStore(db, create=resume is not True)
    try:
        resumed = resume is True or (resume is None and store.latest_round() >= 0)
        if resumed:
            stored = store.get_meta("config")
            changed = config_differences(stored, toml) if stored is not None else []
            # Trackers only watch a run, so their settings may change on a resume.
            if {k for k in changed if not k.startswith("tracking.")} - set(extendable):
                what = (
                    " (only " + ", ".join([*(f"`{k}`" for k in extendable), "`tracking.*`"]) + " may change)"
                )
                raise RunStateError(
                    f"{run_dir} holds a run with a different configuration (differs in {', '.join(changed)}); "
                    f"a resumed run keeps its configuration{what}: undo the change, or start a new run "
                    f"in another {option}"
                )
            if changed:
                store.set_meta("config", toml)
            state = store.load_state() if store.latest_round() >= 0 else init()
            client_states = store.client_states()
            history = [m for m in store.metrics(up_to=state.round) if m.get("round", 0) > 0]
        else:
            store.set_meta("config", toml)
            state = init()
            store.commit_round(state, {"round": 0}, {}, keep=cfg.checkpoint.keep)
            client_states, history = {}, []
        # metrics.jsonl agrees with the database (a kill may have cut it mid-line)
        write_atomically(run_dir / METRICS, "".join(json.dumps(m) + "\n" for m in history).encode("utf-8"))
        store.set_meta("status", "running")
    except BaseException:
        store.close()
        raise
    return OpenRun(store=store, state=state, client_states=client_states, history=history, resumed=resumed)


def finish_run(run: OpenRun, state: ServerState, reason: str) -> None:
    """The run ended with ``state``: write the final model and mark the run completed."""
    write_atomically(run.store.path.parent / MODEL, params_to_bytes(state.params))
    run.store.set_meta("status", "completed")
    run.store.set_meta("stop_reason", reason)


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
