"""pack/unpack round trips, with fresh shared segments and with an arena mapped before fork."""

from __future__ import annotations

import multiprocessing as mp
from typing import Any

import pytest
import torch

from fedloom.sim.transport import Arena, ArenaSlice, pack, unpack


def _sample() -> dict[str, Any]:
    shared = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    return {
        "w": shared,
        "again": shared,  # the same tensor twice is stored once and comes back as one tensor
        "ints": torch.tensor([3, -1, 7], dtype=torch.int64),
        "empty": torch.empty(0, dtype=torch.float32),
        "meta": ("round", 4, 0.5),
    }


def _check(got: dict[str, Any]) -> None:
    want = _sample()
    for key in ("w", "ints", "empty"):
        assert got[key].dtype == want[key].dtype
        assert torch.equal(got[key], want[key])
    assert got["again"] is got["w"]
    assert got["meta"] == ("round", 4, 0.5)


def test_round_trip_through_fresh_shared_buffers() -> None:
    packed = pack(_sample())
    assert all(isinstance(b, torch.Tensor) and b.is_shared() for b in packed.buffers)
    assert len(packed.buffers) == 2  # one flat buffer per dtype
    _check(unpack(packed))


def test_round_trip_through_an_arena_sends_only_offsets() -> None:
    arena = Arena(1 << 16)
    packed = pack(_sample(), arena)
    assert all(isinstance(b, ArenaSlice) for b in packed.buffers)
    assert all(b.offset % 64 == 0 for b in packed.buffers if isinstance(b, ArenaSlice))
    _check(unpack(packed, arena))
    with pytest.raises(ValueError, match="arena"):
        unpack(packed)


def test_a_full_arena_falls_back_to_a_fresh_segment() -> None:
    arena = Arena(64)  # holds the six float32s, not the int64s after them
    packed = pack(_sample(), arena)
    kinds = [type(b) for b in packed.buffers]
    assert kinds == [ArenaSlice, torch.Tensor]
    _check(unpack(packed, arena))


def test_reset_reuses_the_region() -> None:
    arena = Arena(1 << 12)
    first = pack({"x": torch.ones(4)}, arena)
    arena.reset()
    second = pack({"x": torch.full((4,), 2.0)}, arena)
    assert first.buffers == second.buffers  # same slice: the region was reused
    assert torch.equal(unpack(first, arena)["x"], torch.full((4,), 2.0))  # old views see new data


def test_a_tensor_already_in_the_arena_travels_as_its_place_not_a_copy() -> None:
    arena = Arena(1 << 16)
    inside = arena.empty(torch.empty(2, 3))  # e.g. an update written there by its computation
    inside.copy_(torch.arange(6, dtype=torch.float32).reshape(2, 3))
    outside = torch.tensor([3, -1, 7], dtype=torch.int64)
    used = arena.holds(inside)
    assert used is not None
    assert used.numel == 6
    assert arena.holds(outside) is None
    assert arena.holds(inside.t()) is None  # not contiguous: copied like any other tensor
    packed = pack({"delta": inside, "ints": outside}, arena)
    assert packed.buffers[0] == used  # referenced where it lies...
    assert len(packed.buffers) == 2  # ...and only the int64s were copied, into a slice of their own
    got = unpack(packed, arena)
    assert torch.equal(got["delta"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert torch.equal(got["ints"], outside)
    inside.fill_(-1.0)  # the receiver's view is the same memory: nothing was copied
    assert torch.equal(got["delta"], torch.full((2, 3), -1.0))


def test_an_arena_hands_out_fresh_memory_once_full() -> None:
    arena = Arena(64)
    assert arena.holds(arena.empty(torch.empty(16))) is not None  # 64 bytes: fits
    spill = arena.empty(torch.empty(4))
    assert arena.holds(spill) is None
    assert spill.shape == (4,)


def _child(arena: Arena, conn: Any) -> None:
    conn.send(pack({"delta": torch.linspace(0, 1, 1000), "n": 12}, arena))
    conn.close()


def test_an_arena_mapped_before_fork_carries_data_between_processes() -> None:
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("needs the fork start method")
    arena = Arena(1 << 16)
    parent, child = mp.get_context("fork").Pipe()
    proc = mp.get_context("fork").Process(target=_child, args=(arena, child))
    proc.start()
    got = unpack(parent.recv(), arena)
    proc.join(timeout=10)
    assert proc.exitcode == 0
    assert got["n"] == 12
    assert torch.equal(got["delta"], torch.linspace(0, 1, 1000))
