"""The server's checks on what clients send, on the real Coordinator, SQLite state and algorithms.

Each test names the hostile input and what the server must do with it; the values are hand-made so
the expected outcome (which update is rejected, the aggregate's value) is known without the code.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
import torch

from fedloom.algorithms import FedAvg, FedNova, Scaffold
from fedloom.algorithms.api import Broadcast, ClientUpdate, ServerContext, ServerState
from fedloom.algorithms.requirements import UNDECLARED, UpdateRequirements, requirements_of
from fedloom.config.schema import ExperimentConfig
from fedloom.core.errors import RunStateError, UpdateError
from fedloom.core.params import Params
from fedloom.net.coordinator import Coordinator
from fedloom.net.guard import guarded_apply, model_problem
from fedloom.net.logs import JsonLog
from fedloom.net.refusals import RefusalGate, clip_name
from fedloom.net.rollback import roll_back
from fedloom.net.state import NetState
from fedloom.net.wire import UpdateMeta, encode_broadcast, encode_update
from fedloom.results.store import RunStore
from fedloom.sim.build import build_pipeline


def _p(fill: float = 0.0) -> Params:
    return Params({"w": torch.full((3, 4), fill), "b": torch.full((4,), fill)})


def _coordinator(
    tmp_path: Path, clients: int, req: UpdateRequirements = UNDECLARED, **kw: object
) -> tuple[Coordinator, NetState]:
    net = NetState(tmp_path / "state.sqlite")
    coord = Coordinator(
        [f"c{i}" for i in range(clients)],
        net,
        build_pipeline(ExperimentConfig()),
        JsonLog("t", stream=io.StringIO()),
        requirements=req,
        **kw,  # type: ignore[arg-type]
    )
    return coord, net


def _open(coord: Coordinator, net: NetState, r: int, params: Params, selected: list[int]) -> str:
    b = Broadcast(round=r, params=params)
    blob = encode_broadcast(b)
    digest = hashlib.sha256(blob).hexdigest()
    coord.open_round(
        b,
        blob,
        digest,
        attempt=1,
        selected=selected,
        target=len(selected),
        deadline_s=60.0,
        ctx=ServerContext(seed=0, round=r, population=len(coord.names)),
        pending=net.pending(r),
    )
    return digest


def _submit(coord: Coordinator, digest: str, u: ClientUpdate, r: int = 1) -> str | None:
    meta, blob = encode_update(u)
    return coord.submit(u.client_id, r, digest, meta, blob)


def test_algorithms_declare_what_their_updates_carry() -> None:
    assert requirements_of(Scaffold()) == UpdateRequirements(extras=("control_delta",))
    assert requirements_of(FedNova()) == UpdateRequirements(min_steps=1)
    assert requirements_of(FedAvg()) == UpdateRequirements()
    assert requirements_of(object()) is UNDECLARED


def test_scaffold_update_without_its_control_delta_is_rejected_naming_client_round_and_field(
    tmp_path: Path,
) -> None:
    coord, net = _coordinator(tmp_path, 4, requirements_of(Scaffold()))
    params = _p()
    d = _open(coord, net, 1, params, [0, 1, 2, 3])
    missing = ClientUpdate(0, _p(0.1), 1.0, 5, 3)
    assert "client 'c0' for round 1" in (_submit(coord, d, missing) or "")
    assert "missing ['control_delta']" in (_submit(coord, d, missing) or "")
    partial = ClientUpdate(1, _p(0.1), 1.0, 5, 3, extras={"control_delta": Params({"w": torch.zeros(3, 4)})})
    why = _submit(coord, d, partial) or ""
    assert "extra 'control_delta'" in why
    assert "different parameter names" in why
    shaped = ClientUpdate(2, _p(0.1), 1.0, 5, 3, extras={"control_delta": _p(0.2).map(lambda v: v.double())})
    assert "dtype" in (_submit(coord, d, shaped) or "")
    smuggled = ClientUpdate(3, _p(0.1), 1.0, 5, 3, extras={"control_delta": _p(0.2), "x": _p(0.0)})
    assert "unexpected ['x']" in (_submit(coord, d, smuggled) or "")
    good = ClientUpdate(3, _p(0.1), 1.0, 5, 3, extras={"control_delta": _p(0.2)})
    assert _submit(coord, d, good) is None
    assert len(net.audit_rows("rejected")) == 5
    net.clear_pending(1)
    net.close()


def test_fednova_update_with_no_local_step_is_rejected(tmp_path: Path) -> None:
    coord, net = _coordinator(tmp_path, 2, requirements_of(FedNova()))
    d = _open(coord, net, 1, _p(), [0, 1])
    why = _submit(coord, d, ClientUpdate(0, _p(0.1), 4.0, 4, 0)) or ""
    assert "client 'c0' for round 1: num_steps = 0, the algorithm needs at least 1" in why
    assert _submit(coord, d, ClientUpdate(1, _p(0.1), 4.0, 4, 2)) is None
    net.clear_pending(1)
    net.close()


def test_a_restored_pending_update_is_checked_again_and_a_bad_one_dropped(tmp_path: Path) -> None:
    """A pending row that fails the algorithm's requirements (written before a restart) becomes a
    rejection with its row dropped; the round opens with the good rows, and the client may send again."""
    net = NetState(tmp_path / "state.sqlite")
    bad_meta, bad_blob = encode_update(ClientUpdate(0, _p(0.1), 1.0, 5, 3))  # no control delta
    good = ClientUpdate(1, _p(0.1), 1.0, 5, 3, extras={"control_delta": _p(0.2)})
    good_meta, good_blob = encode_update(good)
    net.add_pending(1, 0, "c0", bad_meta, bad_blob, "attempt 1")
    net.add_pending(1, 1, "c1", good_meta, good_blob, "attempt 1")
    net.close()
    coord, net = _coordinator(tmp_path, 2, requirements_of(Scaffold()))
    d = _open(coord, net, 1, _p(), [0, 1])  # the old code accepted row 0 here; aggregation then raised
    (rejected,) = net.audit_rows("rejected")
    assert (rejected.round, rejected.client) == (1, "c0")
    assert "restored update" in rejected.detail
    assert "control_delta" in rejected.detail
    assert [p.client_id for p in net.pending(1)] == [1]
    fixed = ClientUpdate(0, _p(0.1), 1.0, 5, 3, extras={"control_delta": _p(0.2)})
    assert _submit(coord, d, fixed) is None  # asked again: its dropped row does not block the new one
    closed = coord.wait_close()
    assert [u.client_id for u in closed.updates] == [0, 1]
    net.clear_pending(1)
    net.close()


def test_a_failure_report_after_an_accepted_update_is_refused_and_does_not_close_the_round(
    tmp_path: Path,
) -> None:
    coord, net = _coordinator(tmp_path, 2)
    d = _open(coord, net, 1, _p(), [0, 1])
    assert _submit(coord, d, ClientUpdate(0, _p(0.1), 1.0, 5, 3)) is None
    why = coord.report_failure(0, 1, "diverged") or ""
    assert "already sent an accepted update" in why
    assert coord.report_failure(1, 1, "diverged") is None
    assert "already reported a failure" in (_submit(coord, d, ClientUpdate(1, _p(0.1), 1.0, 5, 3)) or "")
    assert "already sent a failure report" in (coord.report_failure(1, 1, "again") or "")
    closed = coord.wait_close()
    assert [u.client_id for u in closed.updates] == [0]
    assert closed.failed == {1: "diverged"}
    assert [r.client for r in net.audit_rows("failed")] == ["c1"]
    net.clear_pending(1)
    net.close()


def test_weights_over_the_cap_are_rejected_and_uniform_weighting_ignores_reported_ones(
    tmp_path: Path,
) -> None:
    """Weights 10 and 1000 with deltas 1 and 3: the reported mean is (10 + 3000) / 1010; uniform is 2."""
    coord, net = _coordinator(tmp_path, 3, max_weight=1000.0, weighting="uniform")
    params = _p()
    d = _open(coord, net, 1, params, [0, 1, 2])
    why = _submit(coord, d, ClientUpdate(2, _p(5.0), 1e300, 5, 3)) or ""
    assert "client 'c2' for round 1: weight 1e+300 exceeds deploy.max_weight = 1000" in why
    assert _submit(coord, d, ClientUpdate(0, _p(1.0), 10.0, 5, 3)) is None
    assert _submit(coord, d, ClientUpdate(1, _p(3.0), 1000.0, 5, 3)) is None
    coord.report_failure(2, 1, "gave up")
    closed = coord.wait_close()
    assert [u.weight for u in closed.updates] == [1.0, 1.0]
    state = ServerState(round=0, params=params)
    ctx = ServerContext(seed=0, round=1, population=3)
    new = guarded_apply(FedAvg(), build_pipeline(ExperimentConfig()), state, closed.updates, ctx).state
    assert new is not None
    assert torch.equal(new.params["w"], torch.full((3, 4), 2.0))
    net.clear_pending(1)
    net.close()
    with pytest.raises(ValueError, match="weighting"):
        _coordinator(tmp_path / "x", 1, weighting="by_size")


def test_an_update_whose_squared_norm_overflows_float32_is_rejected_without_a_norm_bound(
    tmp_path: Path,
) -> None:
    """One element of 3e38 is finite, but 9e76 is not a float32: the model it makes has a NaN loss."""
    coord, net = _coordinator(tmp_path, 2)
    d = _open(coord, net, 1, _p(), [0, 1])
    huge = _p(0.0)
    huge["w"][0, 0] = 3e38
    why = _submit(coord, d, ClientUpdate(0, huge, 5.0, 5, 3)) or ""
    assert "client 'c0' for round 1: its squared L2 norm overflows float32" in why
    spread = _p(1e18)  # 16 elements of 1e18: each fine, the squares' sum (1.6e37) too
    assert _submit(coord, d, ClientUpdate(1, spread, 5.0, 5, 3)) is None
    net.clear_pending(1)
    net.close()


@pytest.mark.parametrize(
    ("meta", "expected"),
    [
        ('{"weight": ' + "9" * 5000 + ', "num_examples": 1, "num_steps": 1}', "does not parse"),
        ('{"weight": 1, "num_examples": 1, "num_steps": 1, "m": ' + "[" * 50000 + "]" * 50000 + "}", "parse"),
        ('{"weight": 1, "num_examples": 1, "num_steps": 1, "metrics": {"a": 1' + "0" * 400 + "}}", "metrics"),
        ('{"weight": 1' + "0" * 400 + ', "num_examples": 1, "num_steps": 1}', "an integer of"),
        ('{"weight": 1, "num_examples": 1, "num_steps": 1, "compute_s": NaN}', "compute_s"),
        ('{"weight": 1, "num_examples": 1, "num_steps": 1' + "0" * 30 + "}", "num_steps"),
    ],
)
def test_header_parse_errors_are_update_errors_and_free_the_staged_slot(
    tmp_path: Path, meta: str, expected: str
) -> None:
    with pytest.raises(UpdateError, match=expected):
        UpdateMeta.from_json(meta)
    coord, net = _coordinator(tmp_path, 1)
    d = _open(coord, net, 1, _p(), [0])
    blob = encode_update(ClientUpdate(0, _p(0.1), 1.0, 1, 1))[1]
    for _ in range(30):
        why = coord.submit(0, 1, d, meta, blob) or ""
        assert expected in why
        assert len(why) <= 600
    assert len(list(net.blob_dir.iterdir())) == 1  # one slot, reused 30 times: none leaked
    assert len(net.audit_rows("rejected")) == 30
    net.close()


def test_guard_leaves_out_the_update_whose_step_count_blows_fednova_up() -> None:
    """FedNova weighs client i by p_i * tau_eff / tau_i: one client reporting 2**62 steps makes the
    others' coefficients ~1e17, and their deltas of 1e4 an aggregate past float32. Without it the two
    honest updates (equal weights and steps) average to 1e4 * (1 + 3) / 2."""
    pipeline = build_pipeline(ExperimentConfig())
    state = ServerState(round=0, params=_p(0.0))
    ctx = ServerContext(seed=0, round=1, population=3)
    updates = [
        ClientUpdate(0, _p(1e4), 10.0, 10, 10),
        ClientUpdate(1, _p(3e4), 10.0, 10, 10),
        ClientUpdate(2, _p(0.0), 10.0, 10, 2**62),
    ]
    out = guarded_apply(FedNova(), pipeline, state, updates, ctx)
    assert sorted(out.blamed) == [2]
    assert "left out" in out.blamed[2]
    assert out.state is not None
    assert torch.equal(out.state.params["w"], torch.full((3, 4), 2e4))
    # The same updates once checked on arrival: no client can end the server by them.
    scaffold = [
        ClientUpdate(0, _p(1.0), 1.0, 1, 1, extras={"control_delta": _p(0.0)}),
        ClientUpdate(1, _p(1.0), 1.0, 1, 1),
    ]
    s = Scaffold().server_init(_p(0.0))
    out = guarded_apply(Scaffold(), pipeline, s, scaffold, ctx)
    assert sorted(out.blamed) == [1]
    assert out.state is not None
    # Nothing to leave out: the attempt makes no model, every update is dropped with a reason.
    alone = guarded_apply(FedNova(), pipeline, state, [updates[0], updates[2]], ctx)
    assert alone.state is None
    assert sorted(alone.blamed) == [0, 2]
    assert "overflows float32" in alone.reason or "NaN" in alone.reason
    assert model_problem(_p(float("nan"))) is not None
    assert model_problem(_p(1.0)) is None


def test_refusal_gate_records_a_burst_then_a_rate_and_counts_the_rest() -> None:
    now = [0.0]
    gate = RefusalGate(burst=5, per_minute=20.0, clock=lambda: now[0])
    assert [gate.admit() for _ in range(8)] == [0, 0, 0, 0, 0, None, None, None]
    now[0] = 3.0  # 20 a minute: one more after 3 s, carrying the 3 not recorded
    assert gate.admit() == 3
    assert gate.admit() is None
    assert (gate.total, gate.suppressed) == (10, 1)
    assert clip_name("x" * 2048) == "x" * 64 + "...(2048 chars)"
    assert clip_name("va") == "va"


def test_rollback_makes_a_kept_checkpoint_the_latest(tmp_path: Path) -> None:
    db = tmp_path / "state.sqlite"
    with RunStore(db, create=True) as store, NetState(db) as net:
        for r in range(4):
            store.commit_round(ServerState(round=r, params=_p(float(r))), {"round": r}, {}, keep=3)
        net.add_pending(4, 0, "c0", "{}", b"x" * 10, "attempt 1")
        net.add_pending(1, 0, "c0", "{}", b"y" * 10, "attempt 1")  # a round at or before the target stays
    (tmp_path / "model.safetensors").write_bytes(b"final")
    with pytest.raises(RunStateError, match=r"kept rounds: \[1, 2, 3\]"):
        roll_back(tmp_path, 0)
    assert roll_back(tmp_path, 2) == [3]
    with RunStore(db) as store, NetState(db) as net:
        assert store.latest_round() == 2
        assert torch.equal(store.load_state().params["w"], torch.full((3, 4), 2.0))
        assert [m["round"] for m in store.metrics()] == [0, 1, 2]
        assert store.get_meta("status") == "rolled_back"
        assert net.pending(4) == []
        assert [p.client_id for p in net.pending(1)] == [0]
        (row,) = net.audit_rows("rollback")
        assert json.loads(row.detail) == {"to_round": 2, "dropped": [3]}
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1, 2]
    assert not (tmp_path / "model.safetensors").exists()
    with pytest.raises(RunStateError, match="holds no server state"):
        roll_back(tmp_path / "nowhere", 1)
