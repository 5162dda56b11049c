"""Compression in deployment: real server and client processes on loopback.

An 8-bit run: the server receives the packed bytes (its byte count per update within 1% of the
size computed by hand), the broadcast travels as q8, and the final model is the simulation's with
the same codecs, bit for bit. A top-k run: a client SIGKILLed and restarted resumes from the
error-feedback residual on its disk, to the uninterrupted run's model. A malformed packed payload
is refused by the real coordinator, naming the client and the field.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path

import pytest
import torch
from tests.net.helpers import (
    BASE_TOML,
    HOSPITALS,
    Proc,
    client,
    deployed_run,
    free_port,
    server,
    simulate_deployed,
    write_config,
)

from fedloom.algorithms.api import Broadcast, ClientUpdate, ServerContext
from fedloom.config.loader import load_config
from fedloom.core.params import Params
from fedloom.core.serde import params_from_bytes, slots_from_bytes
from fedloom.engine import BytesMoved, read_events
from fedloom.net.coordinator import Coordinator
from fedloom.net.logs import JsonLog
from fedloom.net.state import NetState
from fedloom.net.wire import encode_broadcast, encode_update
from fedloom.results.store import RunStore
from fedloom.sim.build import build_pipeline
from fedloom.transforms.compression.packed import CODEC_SLOT, RESIDUAL_KEY

pytestmark = pytest.mark.slow

HIDDEN = 200  # 2NN 13-200-200-2: 43,402 parameters, so the blob's header is well under 1%
COMPRESSED = (
    BASE_TOML.replace("hidden = 100", f"hidden = {HIDDEN}").replace('name = "scaffold"', 'name = "fedavg"')
    + '\n[compression]\ncodec = "qsgd"\nbits = 8\ndownlink = "q8"\n'
)
# With patches: every hospital trains every round, so from round 2 on each holds the last broadcast
TOPK = (
    BASE_TOML.replace('name = "scaffold"', 'name = "fedavg"')
    + '\n[compression]\ncodec = "topk"\nfraction = 0.05\ndownlink = "bf16"\ndownlink_patch = true\n'
    + "[checkpoint]\nkeep = 0\n"
)


def _model(run: Path) -> Params:
    return params_from_bytes((run / "srv" / "model.safetensors").read_bytes())


@pytest.fixture(scope="module")
def q8_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("q8")
    deployed_run(cwd, write_config(cwd / "exp.toml", base=COMPRESSED))
    return cwd


@pytest.fixture(scope="module")
def topk_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("topk")
    deployed_run(cwd, write_config(cwd / "exp.toml", base=TOPK))
    return cwd


def _server_events(run: Path, event: str) -> list[dict[str, object]]:
    lines = (run / "server.err").read_text(encoding="utf-8").splitlines()
    return [e for e in (json.loads(x) for x in lines if x.startswith("{")) if e.get("event") == event]


def test_the_server_receives_the_packed_bytes_within_one_percent_of_the_hand_computed_size(
    q8_run: Path,
) -> None:
    d = 13 * HIDDEN + HIDDEN + HIDDEN * HIDDEN + HIDDEN + HIDDEN * 2 + 2
    tensors = 6
    packed = d + 4 * tensors + 5 * 8  # one byte per coordinate, a float32 scale per tensor, the meta
    fp32 = 4 * d
    accepted = _server_events(q8_run, "update_accepted")
    assert len(accepted) == 16  # 4 rounds x 4 hospitals
    for e in accepted:
        got = int(e["bytes"])  # type: ignore[call-overload]
        assert abs(got - packed) <= 0.01 * packed, (got, packed)
        assert got <= 0.26 * fp32


def test_the_deployed_8bit_run_ends_on_the_simulations_model(
    q8_run: Path, heart_dir: Path, tmp_path: Path
) -> None:
    sim = simulate_deployed(q8_run, heart_dir, tmp_path / "sim")
    deployed = _model(q8_run)
    assert list(sim.state.params) == list(deployed)
    for k in deployed:
        assert torch.equal(sim.state.params[k], deployed[k]), k
    # Per round: the packed uplink and q8 downlink, as the simulation counts them.
    d = deployed.num_elements()
    assert sim.final_metrics["bytes_up"] == 4 * (d + 6 * 4 + 40)
    assert sim.final_metrics["bytes_down"] == 4 * (d + 6 * 4)


def test_clients_holding_the_last_broadcast_get_a_patch_and_end_on_the_simulations_model(
    topk_run: Path, heart_dir: Path, tmp_path: Path
) -> None:
    # Each hospital rebuilt rounds 2-4's broadcasts from patches (checked against the model's digest).
    for h in HOSPITALS:
        lines = (topk_run / f"{h}.err").read_text(encoding="utf-8").splitlines()
        events = [json.loads(x) for x in lines if x.startswith("{")]
        assert [e["round"] for e in events if e["event"] == "broadcast_patched"] == [2, 3, 4], h
        assert not [e for e in events if e["event"] == "patch_refused"], h
    # The bytes sent: round 1 whole; then the patch, whose tensors are, per tensor, 2 + 4 bytes for
    # each bfloat16 coordinate that changed between the two models saved (or the tensor whole, 2
    # bytes a coordinate, where that is less), plus the patch's header.
    with RunStore(topk_run / "srv" / "state.sqlite") as store:
        models = [store.load_state(r).params for r in (0, 1, 2, 3)]
    down = [e.down for e in read_events(topk_run / "srv" / "events.jsonl") if isinstance(e, BytesMoved)]
    whole = len(encode_broadcast(Broadcast(round=1, params=models[0]), "bf16"))
    assert down[0] == 4 * whole
    for r in (2, 3, 4):
        before, now = models[r - 2], models[r - 1]
        tensors = 0
        for k in now:
            a, b = (m[k].to(torch.bfloat16).view(torch.int16) for m in (before, now))
            tensors += min(6 * int((a != b).sum()), 2 * a.numel())
        per_client = down[r - 1] / 4
        assert tensors < per_client <= tensors + 2048, (r, per_client, tensors)
        assert per_client < 0.5 * whole
    # Lossless: the simulation (where clients always hold the whole broadcast) ends on the same model.
    sim = simulate_deployed(topk_run, heart_dir, tmp_path / "sim")
    deployed = _model(topk_run)
    assert list(sim.state.params) == list(deployed)
    for k in deployed:
        assert torch.equal(sim.state.params[k], deployed[k]), k


def test_a_topk_client_sigkilled_and_restarted_resumes_from_its_residual_on_disk(
    topk_run: Path, tmp_path: Path
) -> None:
    saved = sorted((topk_run / "cstate" / "va").glob("state-r*.safetensors"))
    assert saved
    residual = slots_from_bytes(saved[-1].read_bytes())[RESIDUAL_KEY]
    assert residual.l2_norm() > 0
    # Here the broadcasts (and patches) fit one message and come with the task, not streamed.
    cfg = write_config(
        tmp_path / "exp.toml", base=TOPK.replace("max_message_bytes = 4096", "max_message_bytes = 1048576")
    )
    port = free_port()
    srv = server(tmp_path, cfg, port)
    procs = {h: client(tmp_path, h, port) for h in HOSPITALS}
    va2: Proc | None = None
    try:
        srv.wait_event("round_committed", round=2)
        procs["va"].kill()
        va2 = client(tmp_path, "va", port, name="va2")
        assert srv.wait(180) == 0, srv.err.read_text()[-3000:]
        assert va2.wait(60) == 0, va2.err.read_text()[-2000:]
        for h in HOSPITALS[:3]:
            assert procs[h].wait(60) == 0, procs[h].err.read_text()[-2000:]
    finally:
        for p in [srv, *procs.values()] + ([va2] if va2 is not None else []):
            p.stop()
    accepted = [e["round"] for e in va2.events("update_accepted")]
    assert accepted
    assert min(accepted) >= 3
    assert _model(tmp_path).equal(_model(topk_run))
    # The restarted client held no broadcast: its first round came whole, the later ones as patches.
    assert [e["round"] for e in va2.events("broadcast_patched")] == accepted[1:]
    for h in HOSPITALS[:3]:
        assert [e["round"] for e in procs[h].events("broadcast_patched")] == [2, 3, 4], h


def test_a_malformed_packed_upload_is_refused_naming_client_and_field(tmp_path: Path) -> None:
    cfg = load_config(None, ['compression.codec="qsgd"', "compression.bits=4"])
    net = NetState(tmp_path / "state.sqlite")
    coord = Coordinator(
        ["c0", "c1", "c2", "c3"], net, build_pipeline(cfg), JsonLog("t", stream=io.StringIO())
    )
    params = Params({"w": torch.zeros(3, 4), "b": torch.zeros(4)})
    b = Broadcast(round=1, params=params)
    blob = encode_broadcast(b)
    digest = hashlib.sha256(blob).hexdigest()
    ctx = ServerContext(seed=0, round=1, population=4)
    coord.open_round(b, blob, digest, attempt=1, selected=[0, 1, 2, 3], target=4, deadline_s=60.0, ctx=ctx)
    good = build_pipeline(cfg).client(
        ClientUpdate(0, Params({"w": torch.full((3, 4), 0.1), "b": torch.full((4,), -0.2)}), 1.0, 5, 3), ctx
    )
    slot = good.extras[CODEC_SLOT]

    def send(cid: int, **fields: torch.Tensor) -> str | None:
        u = ClientUpdate(cid, good.delta, 1.0, 5, 3, extras={CODEC_SLOT: Params({**slot, **fields})})
        meta, data = encode_update(u)
        return coord.submit(cid, 1, digest, meta, data)

    assert "client 1: qsgd4 payload field 'codes'" in (send(1, codes=slot["codes"][:3]) or "")
    assert "client 2: qsgd4 payload field 'bits' = 3, expected 4" in (
        send(2, meta=torch.tensor([3, 3, 0, 16, 16])) or ""
    )
    plain = ClientUpdate(3, params, 1.0, 5, 3)
    meta, data = encode_update(plain)
    assert "client 3: qsgd4 payload: the update carries a plain delta" in (
        coord.submit(3, 1, digest, meta, data) or ""
    )
    assert send(0) is None
    assert len(net.audit_rows("rejected")) == 3
    assert math.isclose(float(coord._round.accepted[0].delta["b"][0]), -0.2, rel_tol=0.2)  # type: ignore[union-attr]
    net.clear_pending(1)
    net.close()


def test_the_upload_limit_counts_the_broadcast_at_full_precision(tmp_path: Path) -> None:
    # With a q8 downlink the broadcast blob is a quarter of the float32 update a client may send.
    cfg = load_config(None, ['compression.downlink="q8"'])
    net = NetState(tmp_path / "state.sqlite")
    coord = Coordinator(["c0"], net, build_pipeline(cfg), JsonLog("t", stream=io.StringIO()))
    params = Params({"w": torch.ones(1000, 100)})
    b = Broadcast(round=1, params=params)
    blob = encode_broadcast(b, "q8")
    assert len(blob) < params.num_bytes() / 3
    ctx = ServerContext(seed=0, round=1, population=1)
    coord.open_round(b, blob, "d", attempt=1, selected=[0], target=1, deadline_s=60.0, ctx=ctx)
    assert coord.upload_limit(0) == 2 * params.num_bytes() + 65536
    net.close()
