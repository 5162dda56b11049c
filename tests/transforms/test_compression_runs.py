"""Compression inside whole simulated runs: resume keeps the error-feedback residual, every
executor gives the same bits, the downlink round trip, the wire byte counts, the config's
refusals of combinations that would break a guarantee, and quantisation into the SecAgg ring."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedloom.algorithms.api import Broadcast
from fedloom.config import load_config
from fedloom.config.schema import ExperimentConfig
from fedloom.core.params import Params
from fedloom.results.store import RunStore
from fedloom.secagg.simulate import simulate_secure_sum
from fedloom.sim.build import Components, build_algorithm, build_components, build_pipeline
from fedloom.sim.parallel import ParallelExecutor
from fedloom.sim.runner import run_simulation
from fedloom.transforms.compression.downlink import compress_broadcast, expand_broadcast, round_trip
from fedloom.transforms.compression.packed import RESIDUAL_KEY
from fedloom.transforms.compression.ring import (
    dequantize_ring,
    quantize_into_ring,
    ring_bits,
    ring_fixed_point,
)

BASE = (
    'data.dataset="synthetic"',
    "data.num_clients=8",
    "model.name=2nn",
    "model.kwargs={in_features = 60, hidden = 32, num_classes = 10}",
    "sampling.fraction=0.5",
    "client.steps=4",
    "client.lr=0.05",
    "eval.target_accuracy=0.0",
    "checkpoint.keep=0",
    "executor=sequential",
)


def _cfg(*extra: str, rounds: int = 4) -> ExperimentConfig:
    return load_config(None, (*BASE, *extra, f"rounds={rounds}"))


@pytest.fixture(scope="module")
def comps() -> Components:
    return build_components(_cfg())


def _with(comps: Components, cfg: ExperimentConfig) -> Components:
    return dataclasses.replace(comps, algorithm=build_algorithm(cfg), pipeline=build_pipeline(cfg))


@pytest.mark.parametrize(
    "codec",
    [
        ("compression.codec=topk", "compression.fraction=0.05"),
        ("compression.codec=randk", "compression.fraction=0.2"),
    ],
)
def test_the_error_feedback_residual_is_stored_and_a_resume_continues_from_it(
    codec: tuple[str, ...], comps: Components, tmp_path: Path
) -> None:
    cfg4, cfg2 = _cfg(*codec), _cfg(*codec, rounds=2)
    c = _with(comps, cfg4)
    full = run_simulation(cfg4, tmp_path / "full", components=c)
    run_simulation(cfg2, tmp_path / "part", components=c)
    with RunStore(tmp_path / "part" / "state.sqlite") as store:
        states = store.client_states()
    assert states
    assert all(RESIDUAL_KEY in s.values for s in states.values())
    assert any(s.values[RESIDUAL_KEY].l2_norm() > 0 for s in states.values())
    resumed = run_simulation(cfg4, tmp_path / "part", resume=True, components=c)
    assert resumed.state.params.equal(full.state.params)


def test_a_run_that_drops_the_residual_differs(comps: Components, tmp_path: Path) -> None:
    # Error feedback is not a no-op: the same run without it ends elsewhere.
    on, off = (
        _cfg("compression.codec=topk", "compression.fraction=0.05"),
        _cfg("compression.codec=topk", "compression.fraction=0.05", "compression.error_feedback=false"),
    )
    a = run_simulation(on, tmp_path / "on", components=_with(comps, on))
    b = run_simulation(off, tmp_path / "off", components=_with(comps, off))
    assert not a.state.params.equal(b.state.params)


@pytest.mark.parametrize(
    "codec",
    [
        ("compression.codec=qsgd", "compression.bits=4"),
        ("compression.codec=topk", "compression.fraction=0.05"),
    ],
)
def test_sequential_and_parallel_executors_give_the_same_bits(
    codec: tuple[str, ...], comps: Components, tmp_path: Path
) -> None:
    cfg = _cfg(*codec, rounds=3)
    c = _with(comps, cfg)
    seq = run_simulation(cfg, tmp_path / "seq", components=c)
    pool = ParallelExecutor(c.workspace, c.train, c.pipeline, workers=2)
    try:
        par = run_simulation(cfg, tmp_path / "par", components=c, executor=pool)
    finally:
        pool.close()
    assert seq.state.params.equal(par.state.params)


def test_wire_bytes_per_round_are_the_packed_sizes(comps: Components, tmp_path: Path) -> None:
    d = comps.initial_params.num_elements()
    t = len(comps.initial_params)  # one float32 scale per tensor
    cohort = 4
    cases = {
        ("compression.codec=qsgd", "compression.bits=8"): d + 4 * t + 40,
        ("compression.codec=qsgd", "compression.bits=4", "compression.downlink=bf16"): math.ceil(d / 2)
        + 4 * t
        + 40,
        ("compression.codec=topk", "compression.fraction=0.01"): math.ceil(0.01 * d) * 8 + 40,
    }
    for codec, per_client in cases.items():
        cfg = _cfg(*codec, rounds=1)
        r = run_simulation(cfg, tmp_path / "-".join(codec), components=_with(comps, cfg))
        assert r.final_metrics["bytes_up"] == cohort * per_client, codec
        down = 4 * d if cfg.compression.downlink == "none" else 2 * d + 4 * t
        assert r.final_metrics["bytes_down"] == cohort * down, codec
        events = [
            json.loads(x) for x in (tmp_path / "-".join(codec) / "events.jsonl").read_text().splitlines()
        ]
        moved = [e for e in events if e["type"] == "bytes_moved"]
        assert [(e["up"], e["down"]) for e in moved] == [(cohort * per_client, cohort * down)]
        assert [e["bytes"] for e in events if e["type"] == "client_accepted"] == [per_client] * cohort


def test_downlink_round_trips_and_leaves_non_float_tensors_alone() -> None:
    g = torch.Generator().manual_seed(0)
    params = Params(
        {
            "w": torch.randn(5, 4, generator=g),
            "steps": torch.tensor([3], dtype=torch.int64),
            "z": torch.zeros(3),
        }
    )
    b = Broadcast(round=2, params=params, extras={"c": Params({"w": torch.ones(5, 4)})})
    for mode, tol in (("fp16", 2.0**-11), ("bf16", 2.0**-8), ("q8", 1 / 254)):
        packed, marks = compress_broadcast(b, mode)  # type: ignore[arg-type]
        assert packed.params["steps"].dtype == torch.int64
        assert "steps" not in marks
        assert packed.params.num_bytes() < params.num_bytes()
        back = expand_broadcast(packed, marks, mode)  # type: ignore[arg-type]
        assert torch.equal(back.params["steps"], params["steps"])
        assert torch.equal(back.params["z"], params["z"])
        assert (
            float((back.params["w"] - params["w"]).abs().max()) <= tol * float(params["w"].abs().max()) * 1.01
        )
        assert back.extras["c"].equal(b.extras["c"])
        assert round_trip(b, mode).params.equal(back.params)  # type: ignore[arg-type]


def test_downlink_changes_what_clients_train_from(comps: Components, tmp_path: Path) -> None:
    plain, q8 = _cfg(rounds=2), _cfg("compression.downlink=q8", rounds=2)
    a = run_simulation(plain, tmp_path / "a", components=_with(comps, plain))
    b = run_simulation(q8, tmp_path / "b", components=_with(comps, q8))
    assert not a.state.params.equal(b.state.params)
    assert a.state.params.allclose(b.state.params, atol=0.05)


@pytest.mark.parametrize(
    ("sets", "why"),
    [
        (
            ("privacy.mode=client_clip", "compression.codec=qsgd"),
            "can raise the norm above privacy.clip_norm",
        ),
        (("privacy.mode=client_clip", "compression.codec=fp16"), "use privacy.mode = 'central'"),
        (("secagg.enabled=true", "transforms.clip_norm=1.0", "compression.codec=topk"), "masks are dense"),
        (
            ("secagg.enabled=true", "transforms.clip_norm=1.0", "compression.codec=bf16"),
            "saves nothing on the wire",
        ),
        (
            (
                "secagg.enabled=true",
                "transforms.clip_norm=1.0",
                "compression.codec=qsgd",
                "compression.block=64",
            ),
            "same public scale",
        ),
        (("compression.codec=qsgd", "compression.bits=3"), "compression.bits = 3: expected 2, 4 or 8"),
        (("attack.kind=alie", "attack.fraction=0.2", "compression.codec=qsgd"), "benign deltas in the clear"),
    ],
)
def test_the_config_refuses_combinations_that_break_a_guarantee_naming_why(
    sets: tuple[str, ...], why: str
) -> None:
    with pytest.raises(Exception, match=why):
        load_config(None, (*BASE, *sets))


@pytest.mark.parametrize(
    "sets",
    [
        ("privacy.mode=central", "compression.codec=qsgd"),
        ("privacy.mode=local", "compression.codec=topk"),
        ("privacy.mode=adaptive", "compression.codec=bf16"),
        ("secagg.enabled=true", "transforms.clip_norm=1.0", "compression.codec=qsgd", "compression.bits=8"),
    ],
)
def test_the_config_accepts_the_orders_that_keep_the_guarantees(sets: tuple[str, ...]) -> None:
    load_config(None, (*BASE, *sets))


def test_central_dp_clips_the_decoded_update_and_local_dp_is_compressed_after_noise() -> None:
    central = build_pipeline(_cfg("privacy.mode=central", "compression.codec=qsgd"))
    local = build_pipeline(_cfg("privacy.mode=local", "compression.codec=topk"))
    # The codec is the last client stage: its decode runs first on the server, then DP's.
    assert [type(s).__name__ for s in central.stages] == ["CentralDP", "Qsgd"]
    assert [type(s).__name__ for s in local.stages] == ["LocalDP", "Sparsify"]


@pytest.mark.parametrize(("bits", "n"), [(8, 5), (4, 16), (2, 100), (8, 1000)])
def test_ring_quantised_secure_sum_equals_the_sum_of_dequantised_updates_exactly(bits: int, n: int) -> None:
    length = 50
    fp = ring_fixed_point(1.0, bits, n)
    assert fp.bits == max(8, bits + math.ceil(math.log2(n)))
    assert fp.levels >= (1 << (bits - 1)) - 1  # every client keeps at least its b-bit grid
    rng = np.random.default_rng(bits * 1000 + n)
    vectors = [rng.uniform(-1.5, 1.5, size=length) for _ in range(n)]
    vectors[0][:] = 1.0  # everyone at +clip on some coordinates: the sum must not wrap
    for v in vectors:
        v[:5] = 1.0
    encoded = [quantize_into_ring(v, fp, np.random.default_rng(i)) for i, v in enumerate(vectors)]
    if n <= 16:
        result = simulate_secure_sum(vectors, clip=1.0, bits=fp.bits, fixed_point=fp, encoded=encoded)
        total = result.total
        assert result.included == tuple(range(n))
    else:  # the cryptographic round is quadratic in n; the arithmetic is the same
        from fedloom.secagg.fixedpoint import decode_sum, sum_mod

        total = decode_sum(sum_mod(encoded, fp.bits), fp, num_clients=n)
    dequantised = np.sum([dequantize_ring(e, fp) for e in encoded], axis=0)
    assert np.array_equal(total, dequantised)
    assert np.all(total[:5] == n * 1.0)  # the top of the range, n times, exactly


def test_ring_quantisation_is_unbiased() -> None:
    fp = ring_fixed_point(1.0, 4, 8)
    x = np.linspace(-0.9, 0.9, 16)
    rng = np.random.default_rng(3)
    draws = np.stack([dequantize_ring(quantize_into_ring(x, fp, rng), fp) for _ in range(4000)])
    step = 1 / fp.scale
    assert np.all(np.abs(draws.mean(0) - x) <= 5 * (step / 2) / math.sqrt(4000))
    assert ring_bits(8, 1) == 8
    assert ring_bits(8, 2) == 9
    assert ring_bits(16, 1000) == 26


def test_secure_simulation_with_qsgd_uses_the_narrow_ring(comps: Components, tmp_path: Path) -> None:
    cfg = _cfg(
        "secagg.enabled=true",
        "transforms.clip_norm=1.0",
        "compression.codec=qsgd",
        "compression.bits=8",
        rounds=2,
    )
    r = run_simulation(cfg, tmp_path / "s", components=_with(comps, cfg))
    assert r.final_metrics["secagg_ring_bits"] == 8 + 2  # cohort of 4
    assert r.state.params.all_finite()


def test_the_vectorised_executor_carries_the_residual_like_the_sequential_one(
    comps: Components, tmp_path: Path
) -> None:
    from fedloom.sim.vectorized import VectorizedExecutor

    cfg = _cfg("compression.codec=topk", "compression.fraction=0.05", rounds=3)
    c = _with(comps, cfg)
    seq = run_simulation(cfg, tmp_path / "seq", components=c)
    vec = run_simulation(
        cfg, tmp_path / "vec", components=c, executor=VectorizedExecutor(c.workspace, c.train, c.pipeline)
    )
    with RunStore(tmp_path / "vec" / "state.sqlite") as store:
        states = store.client_states()
    assert all(RESIDUAL_KEY in s.values for s in states.values())
    # Batched training agrees with the sequential loop to float tolerance, not bit for bit.
    assert vec.state.params.allclose(seq.state.params, rtol=0, atol=1e-4)
