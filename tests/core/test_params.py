from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedloom.core.errors import UpdateError
from fedloom.core.params import Params
from fedloom.core.serde import params_from_bytes, params_to_bytes, slots_from_bytes, slots_to_bytes


def _p(a: list[float], b: list[float]) -> Params:
    return Params({"a": torch.tensor(a), "b": torch.tensor(b)})


def test_arithmetic_is_elementwise_and_does_not_mutate() -> None:
    x, y = _p([1.0, 2.0], [3.0]), _p([0.5, 0.5], [1.0])
    z = x + y * 2.0 - y
    assert z["a"].tolist() == [1.5, 2.5]
    assert z["b"].tolist() == [4.0]
    assert x["a"].tolist() == [1.0, 2.0]  # operands untouched
    assert (x / 2.0)["b"].tolist() == [1.5]
    assert (-x)["a"].tolist() == [-1.0, -2.0]
    assert x.add_scaled(y, -2.0)["a"].tolist() == [0.0, 1.0]


def test_norm_dot_and_weighted_sum_match_hand_values() -> None:
    x = _p([3.0, 0.0], [4.0])
    assert x.l2_norm() == pytest.approx(5.0)
    assert x.dot(_p([1.0, 1.0], [1.0])) == pytest.approx(7.0)
    s = Params.weighted_sum([_p([1.0, 1.0], [1.0]), _p([3.0, 5.0], [0.0])], [0.25, 0.75])
    assert s["a"].tolist() == [2.5, 4.0]
    assert s["b"].tolist() == [0.25]


def test_incompatible_params_are_rejected_with_the_name() -> None:
    x = _p([1.0, 2.0], [3.0])
    with pytest.raises(UpdateError, match="'a' has shape"):
        x.check_compatible(Params({"a": torch.zeros(3), "b": torch.zeros(1)}))
    with pytest.raises(UpdateError, match="missing \\['b'\\]"):
        x.check_compatible(Params({"a": torch.zeros(2)}))
    with pytest.raises(UpdateError, match="dtype"):
        x.check_compatible(Params({"a": torch.zeros(2, dtype=torch.float64), "b": torch.zeros(1)}))


def test_all_finite_detects_nan_and_inf() -> None:
    assert _p([1.0, 2.0], [3.0]).all_finite()
    assert not _p([1.0, float("nan")], [3.0]).all_finite()
    assert not _p([1.0, 2.0], [float("inf")]).all_finite()
    assert not _p([float("inf"), float("-inf")], [3.0]).all_finite()  # their sum is NaN, not a number


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64]
)
def test_finite_values_whose_sum_overflows_are_finite(dtype: torch.dtype) -> None:
    big = torch.finfo(dtype if not dtype.is_complex else torch.float32).max
    v = torch.tensor([big, big, -1.0], dtype=dtype)
    assert not torch.isfinite(v.sum()).all()  # the sum overflows...
    assert Params({"w": v}).all_finite()  # ...but every element is finite
    v[2] = float("nan")
    assert not Params({"w": v}).all_finite()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_agrees_with_torch_for_every_float_dtype_and_layout(
    dtype: torch.dtype, bad: float
) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6).to(dtype)
    views = {"contiguous": base, "transposed": base.t(), "strided": base[:, ::2]}
    for name, v in views.items():
        assert Params({"w": v}).all_finite(), name
        spoiled = v.clone()
        spoiled[-1, -1] = bad
        assert not Params({"w": spoiled, "ok": v}).all_finite(), (name, dtype, bad)
        assert not Params({"w": spoiled.t()}).all_finite(), (name, dtype, bad)
    # A parameter that still tracks gradients and integer buffers are handled too.
    assert not Params({"g": torch.tensor([1.0, bad], requires_grad=True)}).all_finite()
    assert Params({"steps": torch.tensor([3, 4]), "w": base}).all_finite()


@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=50))
def test_serde_round_trip_is_bit_exact(values: list[float]) -> None:
    p = Params({"z": torch.tensor(values), "a": torch.tensor(values[::-1]).reshape(-1, 1)})
    q = params_from_bytes(params_to_bytes(p))
    assert list(q) == ["z", "a"]
    assert q.equal(p)


def test_slots_round_trip_keeps_slot_and_key_order() -> None:
    slots = {"m": _p([1.0, 2.0], [3.0]), "v": Params({"k": torch.ones(2, 2)})}
    back = slots_from_bytes(slots_to_bytes(slots))
    assert list(back) == ["m", "v"]
    assert back["m"].equal(slots["m"])
    assert back["v"].equal(slots["v"])
    assert slots_from_bytes(slots_to_bytes({})) == {}


@given(
    st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=6, max_size=6),
    st.lists(st.floats(0.001, 1.0), min_size=5, max_size=5),
    st.integers(0, 5),
    st.integers(0, 5),
)
def test_accumulate_cut_anywhere_equals_one_weighted_sum(
    values: list[float], weights: list[float], cut1: int, cut2: int
) -> None:
    g = torch.Generator().manual_seed(int(abs(values[0])) % 1000)
    items = [Params({"w": torch.randn(3, 4, generator=g) * v, "b": torch.full((2,), v)}) for v in values[:5]]
    whole = Params.weighted_sum(items, weights)
    a, b = sorted((cut1, cut2))
    a = max(a, 1)  # the first piece starts the chain
    b = max(b, a)
    first = Params.accumulate(None, items[:a], weights[:a])
    second = Params.accumulate(first, items[a:b], weights[a:b])
    assert Params.accumulate(second, items[b:], weights[b:]).equal(whole)


def test_accumulate_needs_something_to_start_from() -> None:
    with pytest.raises(ValueError, match="accumulator or at least one item"):
        Params.accumulate(None, [], [])
    with pytest.raises(ValueError, match="2 items but 1 weights"):
        Params.accumulate(None, [_p([1.0], [1.0])] * 2, [1.0])
