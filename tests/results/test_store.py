"""RunStore's checkpoints: tensors in reused files beside the database, rows that name them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fedloom.algorithms.api import ServerState
from fedloom.core.errors import RunStateError
from fedloom.core.params import Params
from fedloom.results.store import CHECKPOINT_DIR, RunStore


def _state(r: int) -> ServerState:
    g = torch.Generator().manual_seed(r)
    params = Params({"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)})
    return ServerState(
        round=r,
        params=params,
        opt_state={"m": params.map(lambda v: v * 0.5), "v": params.map(lambda v: v * v)},
        algo_state={"c": Params({"w": torch.full((4, 3), float(r))})},
    )


def _same(a: ServerState, b: ServerState) -> None:
    assert a.round == b.round
    assert list(a.params) == list(b.params)
    assert a.params.equal(b.params)
    assert sorted(a.opt_state) == sorted(b.opt_state)
    assert all(a.opt_state[k].equal(b.opt_state[k]) for k in a.opt_state)
    assert sorted(a.algo_state) == sorted(b.algo_state)
    assert all(a.algo_state[k].equal(b.algo_state[k]) for k in a.algo_state)


def test_kept_checkpoints_load_bit_exactly_and_files_are_reused(tmp_path: Path) -> None:
    db = tmp_path / "state.sqlite"
    with RunStore(db, create=True) as store:
        for r in range(7):
            store.commit_round(_state(r), {"round": r}, {}, keep=2)
            assert store.latest_round() == r
            # every kept round still loads after each commit: a reused file was never a live one
            for k in range(max(0, r - 1), r + 1):
                _same(store.load_state(k), _state(k))
            if r >= 2:
                with pytest.raises(RunStateError, match=f"no checkpoint for round {r - 2}"):
                    store.load_state(r - 2)
        assert sorted(p.name for p in (tmp_path / CHECKPOINT_DIR).iterdir()) == [
            "ckpt-000000.bin",
            "ckpt-000001.bin",
            "ckpt-000002.bin",
        ]
        assert [m["round"] for m in store.metrics()] == list(range(7))
    with RunStore(db) as store:  # reopened
        _same(store.load_state(), _state(6))


def test_keep_zero_keeps_every_round(tmp_path: Path) -> None:
    with RunStore(tmp_path / "state.sqlite", create=True) as store:
        for r in range(4):
            store.commit_round(_state(r), {"round": r}, {}, keep=0)
        for r in range(4):
            _same(store.load_state(r), _state(r))
    assert len(list((tmp_path / CHECKPOINT_DIR).iterdir())) == 4


def test_a_damaged_checkpoint_file_is_refused_naming_it(tmp_path: Path) -> None:
    with RunStore(tmp_path / "state.sqlite", create=True) as store:
        store.commit_round(_state(0), {"round": 0}, {}, keep=2)
        f = tmp_path / CHECKPOINT_DIR / "ckpt-000000.bin"
        data = bytearray(f.read_bytes())
        data[-1] ^= 0x01
        f.write_bytes(bytes(data))
        with pytest.raises(RunStateError, match=r"round 0 .*ckpt-000000\.bin.* damaged"):
            store.load_state(0)
        f.unlink()
        with pytest.raises(RunStateError, match="cannot be read"):
            store.load_state(0)


def test_a_checkpoint_of_more_pieces_than_one_write_takes(tmp_path: Path) -> None:
    # 1500 tensors and two optimiser slots: well over IOV_MAX (1024 on Linux) pieces to write.
    params = Params({f"t{i}": torch.full((i % 7 + 1,), float(i)) for i in range(1500)})
    state = ServerState(
        round=1, params=params, opt_state={"m": params.map(lambda v: -v), "v": params}, algo_state={}
    )
    with RunStore(tmp_path / "state.sqlite", create=True) as store:
        store.commit_round(state, {"round": 1}, {}, keep=1)
        _same(store.load_state(1), state)


def test_checkpoints_without_pwritev_and_fdatasync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # macOS has neither: the writer falls back to one joined pwrite and fsync.
    monkeypatch.delattr(os, "pwritev", raising=False)
    monkeypatch.delattr(os, "fdatasync", raising=False)
    with RunStore(tmp_path / "state.sqlite", create=True) as store:
        for r in range(3):
            store.commit_round(_state(r), {"round": r}, {}, keep=1)
        _same(store.load_state(2), _state(2))
