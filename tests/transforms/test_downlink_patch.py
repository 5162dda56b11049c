"""Downlink patches (fedloom.transforms.compression.patch): exact, smaller only where they should be,
and refused by name when they do not fit the held broadcast; the simulation counts them."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch

from fedloom.algorithms.api import Broadcast, ServerContext
from fedloom.config import load_config
from fedloom.core.errors import UpdateError
from fedloom.core.params import Params
from fedloom.core.serde import slots_from_bytes
from fedloom.net.coordinator import Coordinator
from fedloom.net.logs import JsonLog
from fedloom.net.state import NetState
from fedloom.net.wire import (
    EMPTY_PATCH,
    encode_broadcast,
    encode_patch,
    fingerprint,
    model_digest,
    patched_broadcast,
)
from fedloom.results.store import RunStore
from fedloom.sim.build import build_algorithm, build_components, build_pipeline
from fedloom.sim.runner import run_simulation
from fedloom.transforms.compression.patch import apply_patch, make_patch


def _same_bits(a: dict[str, Params], b: dict[str, Params]) -> bool:
    if list(a) != list(b):
        return False
    for slot in a:
        if list(a[slot]) != list(b[slot]):
            return False
        for k in a[slot]:
            x, y = a[slot][k], b[slot][k]
            if x.dtype != y.dtype or x.shape != y.shape:
                return False
            if x.numel() and bytes(x.contiguous().view(torch.uint8).reshape(-1).tolist()) != bytes(
                y.contiguous().view(torch.uint8).reshape(-1).tolist()
            ):
                return False
    return True


def _slots() -> dict[str, Params]:
    g = torch.Generator().manual_seed(0)
    return {
        "params": Params(
            {
                "w": torch.randn(1000, generator=g),
                "h": torch.randn(1000, generator=g).to(torch.float16),
                "steps": torch.tensor([7, 8, 9], dtype=torch.int64),
                "mask": torch.tensor([True, False, True]),
            }
        ),
        "dl": Params({"codes": torch.randint(0, 255, (40, 5), generator=g, dtype=torch.uint8)}),
        "x.c": Params({"c": torch.zeros(4)}),
    }


def _changed(old: dict[str, Params]) -> dict[str, Params]:
    new = {slot: Params({k: v.clone() for k, v in p.items()}) for slot, p in old.items()}
    w = new["params"]["w"]
    w[[3, 500, 999]] = torch.tensor([float("nan"), -1.5, 2.0])
    new["params"]["h"][10] = -new["params"]["h"][10]
    new["params"]["steps"][1] = 80
    new["params"]["mask"][1] = True
    new["dl"]["codes"][0, 0] = new["dl"]["codes"][0, 0] ^ 1
    new["x.c"]["c"][2] = -0.0  # equal to 0.0 as a number, another bit pattern
    return new


def test_a_patch_rebuilds_the_new_broadcast_bit_for_bit() -> None:
    old = _slots()
    new = _changed(old)
    patch = make_patch(new, old)
    assert patch is not None
    assert _same_bits(apply_patch(old, patch), new)
    # the signed zero is carried although -0.0 == 0.0, and only the changed positions travel
    assert patch["x.c/c/i"].tolist() == [2]
    assert patch["params/w/i"].tolist() == [3, 500, 999]
    assert patch["params/h/i"].tolist() == [10]
    # nothing changed: an empty patch
    empty = make_patch(old, old)
    assert empty is not None
    assert len(empty) == 0
    assert _same_bits(apply_patch(old, empty), old)


def test_each_tensor_is_patched_only_where_that_is_smaller_than_sending_it_whole() -> None:
    # float32: a changed coordinate costs 4 + 4 bytes; 1000 coordinates cost 4000 whole
    base = torch.zeros(1000)
    for changes, patched in ((10, True), (499, True), (500, False), (1000, False)):
        new = base.clone()
        new[:changes] = 1.0
        patch = make_patch({"p": Params({"t": new})}, {"p": Params({"t": base})})
        assert patch is not None
        if patched:
            assert list(patch) == ["p/t/i", "p/t/v"]
            assert patch.num_bytes() == 8 * changes
        else:
            assert list(patch) == ["p/t/="]
            assert patch.num_bytes() == 4000
    # float16: 2 + 4 bytes a change against 2000 bytes whole: a patch below 334 changes
    half = torch.zeros(1000, dtype=torch.float16)
    for changes, size in ((333, 6 * 333), (334, 2000)):
        new = half.clone()
        new[:changes] = 1.0
        patch = make_patch({"p": Params({"t": new})}, {"p": Params({"t": half})})
        assert patch is not None
        assert patch.num_bytes() == size


def test_broadcasts_of_another_structure_are_not_patched() -> None:
    old = _slots()

    def replace(s: dict[str, Params], key: str, fn) -> None:  # type: ignore[no-untyped-def]
        s["params"] = Params({k: (fn(v) if k == key else v) for k, v in s["params"].items()})

    for change in (
        lambda s: replace(s, "w", lambda v: v[:999]),  # shape
        lambda s: replace(s, "w", lambda v: v.double()),  # dtype
        lambda s: s.pop("x.c"),  # a slot
        lambda s: s.__setitem__("x.d", Params({"d": torch.zeros(1)})),
    ):
        new = _changed(old)
        change(new)
        assert make_patch(new, old) is None


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (
            lambda p: p.__setitem__("params/w/i", torch.tensor([3, 500, 1000], dtype=torch.int32)),
            "'params/w'",
        ),
        (lambda p: p.__setitem__("params/w/i", torch.tensor([500, 3, 999], dtype=torch.int32)), "strictly"),
        (lambda p: p.__setitem__("params/w/i", torch.tensor([3, 500, 999])), "int32"),
        (lambda p: p.__setitem__("params/w/v", torch.zeros(3, dtype=torch.float64)), "values of 'params/w'"),
        (lambda p: p.__setitem__("params/w/v", torch.zeros(2)), "values of 'params/w'"),
        (lambda p: p.pop("x.c/c/v"), "positions of 'x.c/c' come without their values"),
        (lambda p: p.pop("params/w/i"), "'params/w/v'"),
        (lambda p: p.__setitem__("extra/t/=", torch.zeros(1)), "'extra/t/='"),
    ],
)
def test_a_patch_that_does_not_fit_the_held_broadcast_is_refused_by_name(damage, named: str) -> None:  # type: ignore[no-untyped-def]
    old = _slots()
    patch = make_patch(_changed(old), old)
    assert patch is not None
    bad = dict(patch.items())
    damage(bad)
    with pytest.raises(UpdateError, match=named.replace("(", r"\(")):
        apply_patch(old, Params(bad))


def test_the_wire_patch_is_checked_against_the_named_model() -> None:
    g = torch.Generator().manual_seed(1)
    params = Params({"a": torch.randn(4000, generator=g), "b": torch.randn(30, generator=g)})
    extras = {"c": Params({"a": torch.zeros(4000), "b": torch.zeros(30)})}
    first = encode_broadcast(Broadcast(round=1, params=params, extras=extras), "fp16")
    moved = params.map(lambda v: v.clone())
    moved["a"][:40] += 1.0
    second = encode_broadcast(Broadcast(round=2, params=moved, extras=extras), "fp16")
    patch = encode_patch(second, first)
    assert patch is not None
    assert len(patch) < len(second) / 10
    assert patched_broadcast(first, patch, model_digest(second), 2) == second
    # applied to another broadcast of the same structure, it rebuilds another model: refused
    other = encode_broadcast(Broadcast(round=1, params=params.map(lambda v: v + 1), extras=extras), "fp16")
    with pytest.raises(UpdateError, match="not the model named"):
        patched_broadcast(other, patch, model_digest(second), 2)
    with pytest.raises(UpdateError, match="does not parse"):
        patched_broadcast(first, patch[:-3], model_digest(second), 2)
    # every coordinate moved: the patch would be larger, so there is none
    assert (
        encode_patch(encode_broadcast(Broadcast(round=2, params=params.map(lambda v: v * 2))), first) is None
    )
    assert slots_from_bytes(patch).keys() == {"patch"}


def test_the_simulation_counts_patches_to_the_clients_that_hold_the_last_broadcast(tmp_path: Path) -> None:
    """Every client in every round (so every client holds the last broadcast from round 2 on); top-5%
    updates of 8 clients change at most 40% of the coordinates, so the patch is smaller. The bytes
    are checked against the coordinates that changed between the saved models, counted here."""
    base = (
        'data.dataset="synthetic"',
        "data.num_clients=8",
        "model.name=2nn",
        "model.kwargs={in_features = 60, hidden = 32, num_classes = 10}",
        "sampling.fraction=1.0",
        "client.steps=4",
        "client.lr=0.05",
        "eval.target_accuracy=0.0",
        "checkpoint.keep=0",
        "executor=sequential",
        "rounds=4",
        "compression.codec=topk",
        "compression.fraction=0.05",
    )
    plain_cfg = load_config(None, base)
    comps = build_components(plain_cfg)
    runs = {}
    for name, extra in (("plain", ()), ("patched", ("compression.downlink_patch=true",))):
        cfg = load_config(None, (*base, *extra))
        c = dataclasses.replace(comps, algorithm=build_algorithm(cfg), pipeline=build_pipeline(cfg))
        runs[name] = run_simulation(cfg, tmp_path / name, components=c)
    assert _same_bits({"m": runs["plain"].state.params}, {"m": runs["patched"].state.params})
    rows = [json.loads(x) for x in (tmp_path / "patched" / "metrics.jsonl").read_text().splitlines()]
    whole = comps.initial_params.num_bytes()
    assert rows[0]["bytes_down"] == 8 * whole  # nobody holds a broadcast yet
    with RunStore(tmp_path / "patched" / "state.sqlite") as store:
        models = [comps.initial_params] + [store.load_state(r).params for r in (1, 2, 3)]
    for r in (2, 3, 4):
        before, now = models[r - 2], models[r - 1]
        expected = 0
        for k in now:
            changed = int((now[k].view(torch.int32) != before[k].view(torch.int32)).sum())
            expected += min(8 * changed, 4 * now[k].numel())
        assert 0 < expected < whole
        assert rows[r - 1]["bytes_down"] == 8 * expected, r


def test_the_coordinator_offers_each_client_the_form_of_the_round_model_it_can_use(tmp_path: Path) -> None:
    """A real Coordinator: the patch to a client holding the last round's broadcast, an empty patch to
    one holding this round's (an earlier attempt's), the whole broadcast to anyone else or when
    patches are off."""
    last = Params({"w": torch.zeros(1000), "b": torch.zeros(4)})
    now = Params({"w": torch.zeros(1000), "b": torch.ones(4)})
    held_blob = encode_broadcast(Broadcast(round=1, params=last))
    blob = encode_broadcast(Broadcast(round=2, params=now))
    digest, base = model_digest(blob), model_digest(held_blob)
    patch = encode_patch(blob, held_blob)
    assert patch is not None
    ctx = ServerContext(seed=0, round=2, population=3)
    for patching in (True, False):
        with NetState(tmp_path / f"{patching}.sqlite") as net:
            coord = Coordinator(
                ["a", "b", "c"],
                net,
                build_pipeline(load_config(None, [])),
                JsonLog("t", stream=io.StringIO()),
            )
            coord.open_round(
                Broadcast(round=2, params=now), blob, digest, attempt=1, selected=[0, 1, 2], target=3,
                deadline_s=60.0, ctx=ctx, patch=(base, patch) if patching else None,
            )  # fmt: skip
            for held, form in ((base, patch), (digest, EMPTY_PATCH), ("f" * 32, blob), ("", blob)):
                task = coord.task_now(0, held)
                assert task is not None
                sent = form if patching else blob
                assert (task.size, task.xxh3) == (len(sent), fingerprint(sent)), held
                assert task.base == (held if patching and sent is not blob else "")
                assert coord.broadcast_blob(2, digest, task.base) == sent
                if task.base:
                    known = held_blob if held == base else blob
                    assert patched_broadcast(known, sent, digest, 2) == blob
            assert coord.broadcast_blob(2, digest, "f" * 32) is None  # a base nobody offered
