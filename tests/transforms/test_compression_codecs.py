"""Codecs as pipeline stages: round trips, QSGD's unbiasedness and variance, extreme and hostile
inputs, error feedback's bookkeeping, and the packed size of each codec computed by hand."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from fedloom.algorithms.api import ClientState, ClientUpdate, ServerContext
from fedloom.core.errors import UpdateError
from fedloom.core.params import Params
from fedloom.transforms.compression import HalfCast, Qsgd, Sparsify
from fedloom.transforms.compression.packed import (
    CODEC_SLOT,
    RESIDUAL_KEY,
    pack_codes,
    payload_bytes,
    unpack_codes,
)
from fedloom.transforms.compression.qsgd import dequantize, quantize, variance_bound
from fedloom.transforms.pipeline import NormClip, Pipeline, bind_model


def _model() -> Params:
    return Params({"w": torch.zeros(6, 5), "b": torch.zeros(5), "v": torch.zeros(7)})


def _delta(seed: int = 0, scale: float = 1.0) -> Params:
    g = torch.Generator().manual_seed(seed)
    return _model().map(lambda v: torch.randn(v.shape, generator=g) * scale)


def _update(delta: Params, cid: int = 3, state: ClientState | None = None) -> ClientUpdate:
    return ClientUpdate(cid, delta, 10.0, 10, 2, client_state=state)


CTX = ServerContext(seed=7, round=2, population=10)
CODECS = [
    HalfCast("fp16"),
    HalfCast("bf16"),
    Qsgd(8),
    Qsgd(4),
    Qsgd(2),
    Qsgd(4, block=8),
    Sparsify("topk", 0.2),
    Sparsify("randk", 0.2),
    Sparsify("topk", 0.2, error_feedback=False),
    Sparsify("randk", 0.2, error_feedback=False),
]


def _roundtrip(codec: object, u: ClientUpdate, ctx: ServerContext = CTX) -> tuple[ClientUpdate, ClientUpdate]:
    p = bind_model(Pipeline((codec,)), _model())  # type: ignore[arg-type]
    sent = p.client(u, ctx)
    return sent, p.decode(sent, ctx)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_bit_packing_round_trips_every_code_and_has_the_hand_computed_length(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    for n in (0, 1, 7, 8, 9, 1001):
        codes = torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.int64).to(torch.uint8)
        packed = pack_codes(codes, bits)
        assert packed.numel() == math.ceil(n * bits / 8)
        assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_pack_codes_puts_the_first_code_in_the_low_bits() -> None:
    # codes 1, 2, 3, 0 at 2 bits: 0b00_11_10_01 = 0x39
    assert pack_codes(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [0x39]
    assert pack_codes(torch.tensor([0xA, 0x5], dtype=torch.uint8), 4).tolist() == [0x5A]


@pytest.mark.parametrize("codec", CODECS, ids=repr)
def test_every_codec_round_trips_to_the_model_shapes_and_keeps_the_scalars(codec: object) -> None:
    delta = _delta()
    sent, back = _roundtrip(codec, _update(delta))
    assert len(sent.delta) == 0  # only the packed form travels
    assert CODEC_SLOT in sent.extras
    assert CODEC_SLOT not in back.extras
    _model().check_compatible(back.delta)
    assert (back.weight, back.num_examples, back.num_steps) == (10.0, 10, 2)
    flat, got = (
        torch.cat([v.reshape(-1) for v in delta.values()]),
        torch.cat([v.reshape(-1) for v in back.delta.values()]),
    )
    if isinstance(codec, HalfCast):
        dt = torch.float16 if codec.precision == "fp16" else torch.bfloat16
        assert torch.equal(got, flat.to(dt).to(torch.float32))
    elif isinstance(codec, Qsgd):
        levels = (1 << (codec.bits - 1)) - 1
        assert float((got - flat).abs().max()) <= float(flat.abs().max()) / levels * (1 + 1e-6)
    else:
        assert isinstance(codec, Sparsify)
        k = math.ceil(0.2 * flat.numel())
        nz = got.nonzero().reshape(-1)
        assert nz.numel() == k
        if codec.kind == "topk":
            assert set(nz.tolist()) == set(torch.topk(flat.abs(), k).indices.tolist())
            assert torch.equal(got[nz], flat[nz])
        elif codec.error_feedback:
            assert torch.equal(got[nz], flat[nz])
        else:  # unbiased random-k: scaled by d / k
            assert torch.allclose(got[nz], flat[nz] * (flat.numel() / k))


def test_packed_sizes_are_the_hand_computed_ones() -> None:
    d = _model().num_elements()  # 42 coordinates in 3 tensors
    meta = 5 * 8
    sizes = {
        "fp16": payload_bytes(_roundtrip(HalfCast("fp16"), _update(_delta()))[0]),
        "q8": payload_bytes(_roundtrip(Qsgd(8), _update(_delta()))[0]),
        "q4": payload_bytes(_roundtrip(Qsgd(4), _update(_delta()))[0]),
        "q2b8": payload_bytes(_roundtrip(Qsgd(2, block=8), _update(_delta()))[0]),
        "topk": payload_bytes(_roundtrip(Sparsify("topk", 0.1), _update(_delta()))[0]),
        "randk": payload_bytes(_roundtrip(Sparsify("randk", 0.1), _update(_delta()))[0]),
    }
    assert sizes == {
        "fp16": 2 * d + meta,
        "q8": d + 3 * 4 + meta,
        "q4": math.ceil(d / 2) + 3 * 4 + meta,
        "q2b8": math.ceil(d / 4) + math.ceil(d / 8) * 4 + meta,
        "topk": 5 * 8 + meta,  # ceil(0.1 * 42) = 5 values + 5 indices
        "randk": 5 * 4 + meta,  # indices are drawn again on the server
    }


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_qsgd_is_unbiased_and_its_variance_is_the_exact_one_within_the_paper_bound(bits: int) -> None:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(64, generator=g) * torch.linspace(0.01, 2.0, 64)  # [d]
    levels = (1 << (bits - 1)) - 1
    m = float(x.abs().max())
    y = (x.abs() * levels / m).to(torch.float64)
    frac = y - torch.floor(y)
    per_coord_var = (m / levels) ** 2 * frac * (1 - frac)  # exact Var[x_hat_i]
    draws = 4000
    gen = torch.Generator().manual_seed(12345)
    samples = torch.stack([dequantize(*quantize(x, [64], bits, gen), [64], bits) for _ in range(draws)]).to(
        torch.float64
    )  # [draws, d]
    mean = samples.mean(0)
    # Unbiased: every coordinate's mean within 5 standard errors of x (a fixed seed: no flakes).
    se = (per_coord_var / draws).sqrt()
    assert bool(((mean - x.double()).abs() <= 5 * se + 1e-7).all())
    total = float(((samples - x.double()) ** 2).sum(1).mean())
    exact = float(per_coord_var.sum())
    assert abs(total - exact) <= 0.1 * exact
    assert total <= variance_bound(x, bits)


def test_qsgd_draws_depend_on_seed_round_and_client_only() -> None:
    u = _update(_delta(), cid=4)
    a, _ = _roundtrip(Qsgd(2), u)
    b, _ = _roundtrip(Qsgd(2), u)
    c, _ = _roundtrip(Qsgd(2), replace(u, client_id=5))
    d, _ = _roundtrip(Qsgd(2), u, ServerContext(seed=7, round=3, population=10))
    codes = [s.extras[CODEC_SLOT]["codes"] for s in (a, b, c, d)]
    assert torch.equal(codes[0], codes[1])
    assert not torch.equal(codes[0], codes[2])
    assert not torch.equal(codes[0], codes[3])


@pytest.mark.parametrize("codec", CODECS, ids=repr)
def test_an_all_zero_delta_decodes_to_zeros(codec: object) -> None:
    _, back = _roundtrip(codec, _update(_model()))
    assert all(bool((v == 0).all()) for v in back.delta.values())


def test_one_huge_coordinate() -> None:
    delta = _model().map(torch.zeros_like)
    delta = Params(
        {**delta, "w": delta["w"].clone().index_put_((torch.tensor(2), torch.tensor(3)), torch.tensor(1e30))}
    )
    for codec in (Qsgd(8), Qsgd(2), HalfCast("bf16"), Sparsify("topk", 0.05)):
        _, back = _roundtrip(codec, _update(delta))
        assert back.delta.all_finite()
        assert float(back.delta["w"][2, 3]) == pytest.approx(1e30, rel=1e-2), codec
        assert float(back.delta["w"].abs().sum()) == pytest.approx(1e30, rel=1e-2)
    with pytest.raises(UpdateError, match=r"client 3: fp16 cannot hold parameter 'w'.*bf16"):
        _roundtrip(HalfCast("fp16"), _update(delta))


@pytest.mark.parametrize("codec", CODECS, ids=repr)
def test_nan_is_refused_before_encoding_naming_client_and_parameter(codec: object) -> None:
    delta = Params({**_delta(), "b": torch.tensor([0.0, float("nan"), 1.0, 2.0, 3.0])})
    p = Pipeline((codec,))  # type: ignore[arg-type]
    with pytest.raises(UpdateError, match=r"client 3: .* parameter 'b': it holds 1 NaN"):
        p.client(_update(delta), CTX)


def _tamper(sent: ClientUpdate, **fields: torch.Tensor) -> ClientUpdate:
    slot = Params({**sent.extras[CODEC_SLOT], **fields})
    return replace(sent, extras={**sent.extras, CODEC_SLOT: slot})


def _decode(codec: object, sent: ClientUpdate) -> ClientUpdate:
    return bind_model(Pipeline((codec,)), _model()).decode(sent, CTX)  # type: ignore[arg-type]


def test_malformed_packed_payloads_are_refused_naming_client_and_field() -> None:
    q = Qsgd(4)
    sent, _ = _roundtrip(q, _update(_delta()))
    codes = sent.extras[CODEC_SLOT]["codes"]
    cases = [
        (
            q,
            _tamper(sent, codes=codes[:-1]),
            r"client 3: qsgd4 payload field 'codes' is torch.uint8 of shape \(20,\), expected torch.uint8 of shape \(21,\)",
        ),
        (
            q,
            _tamper(sent, meta=torch.tensor([3, 5, 0, 42, 42])),
            r"client 3: qsgd4 payload field 'bits' = 5, expected 4",
        ),
        (
            q,
            _tamper(sent, scales=torch.tensor([1.0, float("nan"), 1.0])),
            r"client 3: qsgd4 payload field 'scales' must be finite",
        ),
        (
            q,
            _tamper(sent, codes=torch.full_like(codes, 0xFF)),
            r"client 3: qsgd4 payload field 'codes' holds a code above 14",
        ),
        (q, replace(sent, delta=_delta()), r"client 3: qsgd4 payload: the update carries a plain delta"),
        (q, replace(sent, extras={}), r"client 3: qsgd4 payload: the update has no 'codec' extra"),
        (Qsgd(8), sent, r"client 3: qsgd8 payload field 'bits' = 4, expected 8"),
    ]
    t = Sparsify("topk", 0.1)
    ts, _ = _roundtrip(t, _update(_delta()))
    idx = ts.extras[CODEC_SLOT]["indices"]
    cases += [
        (
            t,
            _tamper(ts, indices=idx + 1000),
            r"client 3: topk payload field 'indices' holds .* outside \[0, 42\)",
        ),
        (t, _tamper(ts, indices=idx - 1000), r"client 3: topk payload field 'indices' holds -"),
        (
            t,
            _tamper(ts, indices=idx.flip(0)),
            r"client 3: topk payload field 'indices' must be strictly increasing",
        ),
        (
            t,
            _tamper(ts, values=ts.extras[CODEC_SLOT]["values"][:2]),
            r"client 3: topk payload field 'values' is",
        ),
        (t, _tamper(ts, values=ts.extras[CODEC_SLOT]["values"].double()), r"field 'values' is torch.float64"),
    ]
    h = HalfCast("fp16")
    hs, _ = _roundtrip(h, _update(_delta()))
    cases += [
        (
            h,
            _tamper(hs, values=torch.full((42,), float("inf"), dtype=torch.float16)),
            r"client 3: fp16 payload field 'values' holds NaN or inf",
        )
    ]
    for codec, bad, pattern in cases:
        with pytest.raises(UpdateError, match=pattern):
            _decode(codec, bad)


@pytest.mark.parametrize("kind", ["topk", "randk"])
def test_error_feedback_loses_nothing_sent_plus_residual_is_the_sum_of_true_updates(kind: str) -> None:
    codec = Sparsify(kind, 0.1)  # type: ignore[arg-type]
    p = bind_model(Pipeline((codec,)), _model())
    state: ClientState | None = None
    true_sum = _model().map(lambda v: v.double())
    sent_sum = _model().map(lambda v: v.double())
    for r in range(1, 13):
        delta = _delta(seed=r, scale=0.1 * r)
        ctx = ServerContext(seed=7, round=r, population=10)
        out = p.client(_update(delta, state=state), ctx)
        state = out.client_state
        true_sum = true_sum + delta.map(lambda v: v.double())
        sent_sum = sent_sum + p.decode(out, ctx).delta.map(lambda v: v.double())
    assert state is not None
    residual = state.values[RESIDUAL_KEY].map(lambda v: v.double())
    assert (sent_sum + residual).allclose(true_sum, rtol=0, atol=1e-5)
    assert residual.l2_norm() > 0.1  # something was held back, and not lost


def test_error_feedback_keeps_the_other_client_state_entries() -> None:
    kept = Params({"c": torch.ones(2)})
    out = Pipeline((Sparsify("topk", 0.1),)).client(
        _update(_delta(), state=ClientState({"control": kept})), CTX
    )
    assert out.client_state is not None
    assert set(out.client_state.values) == {"control", RESIDUAL_KEY}


def test_norm_clip_before_a_codec_clips_again_on_the_server_instead_of_refusing() -> None:
    delta = _delta(scale=10.0)
    strict = bind_model(Pipeline((NormClip(1.0), Qsgd(2))), _model())
    sent = strict.client(_update(delta), CTX)
    with pytest.raises(UpdateError, match="exceeds the bound"):
        strict.decode(sent, CTX)  # ternary rounding raised the clipped norm
    lenient = bind_model(Pipeline((NormClip(1.0, server_clip=True), Qsgd(2))), _model())
    assert lenient.decode(sent, CTX).delta.l2_norm() <= 1.0 + 1e-6


def test_a_dropped_stragglers_answer_spends_nothing_of_the_residual() -> None:
    from fedloom.algorithms.stragglers import DROPPED

    kept = Params({k: torch.full_like(v, 0.5) for k, v in _model().items()})
    u = replace(_update(_model(), state=ClientState({RESIDUAL_KEY: kept})), metrics={DROPPED: 1.0})
    out = Pipeline((Sparsify("topk", 0.1),)).client(u, CTX)
    assert out.client_state is not None
    assert out.client_state.values[RESIDUAL_KEY].equal(kept)
    assert bool((out.extras[CODEC_SLOT]["values"] == 0).all())
