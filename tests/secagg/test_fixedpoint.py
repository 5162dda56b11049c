"""Fixed-point encoding: golden values, the stated error bound, no wraparound at capacity."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.core.errors import ConfigError, UpdateError
from fedloom.secagg.fixedpoint import (
    FixedPoint,
    decode_sum,
    encode,
    from_wire,
    sum_error_bound,
    sum_mod,
    to_wire,
)


def test_golden_encoding() -> None:
    fp = FixedPoint(1.0, bits=16, max_clients=3)
    assert fp.levels == 32767 // 3 == 10922
    got = encode(np.array([0.5, -0.5, 1.0, -2.0, 0.0]), fp)
    assert got.tolist() == [5461, 65536 - 5461, 10922, 65536 - 10922, 0]
    z = sum_mod([got, got, got], 16)
    np.testing.assert_allclose(decode_sum(z, fp, num_clients=3), [1.5, -1.5, 3.0, -3.0, 0.0], atol=1e-3)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([16, 24, 32, 48, 53]),
    n=st.integers(1, 40),
    clip=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**32 - 1),
)
def test_sum_within_stated_error_bound(bits: int, n: int, clip: float, seed: int) -> None:
    fp = FixedPoint(clip, bits=bits, max_clients=n)
    xs = np.random.default_rng(seed).uniform(-clip, clip, size=(n, 64))
    z = sum_mod([encode(x, fp) for x in xs], bits)
    err = np.max(np.abs(decode_sum(z, fp, num_clients=n) - xs.sum(axis=0)))
    assert err <= sum_error_bound(fp, n)


def test_bound_is_half_a_step_per_client() -> None:
    fp = FixedPoint(2.0, bits=32, max_clients=100)
    assert sum_error_bound(fp, 10) == pytest.approx(10 * 0.5 * 2.0 / fp.levels, rel=1e-6)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_no_wraparound_at_full_capacity(sign: float) -> None:
    fp = FixedPoint(1.0, bits=16, max_clients=7)
    z = sum_mod([encode(np.full(3, sign), fp)] * 7, 16)
    np.testing.assert_allclose(decode_sum(z, fp, num_clients=7), 7 * sign, atol=sum_error_bound(fp, 7))
    with pytest.raises(ConfigError):
        decode_sum(z, fp, num_clients=8)


def test_out_of_range_inputs_are_clipped() -> None:
    fp = FixedPoint(1.0, bits=32, max_clients=2)
    z = sum_mod([encode(np.array([5.0, -5.0]), fp)], 32)
    np.testing.assert_allclose(decode_sum(z, fp, num_clients=1), [1.0, -1.0])


def test_invalid_parameters_are_all_reported() -> None:
    with pytest.raises(ConfigError) as info:
        FixedPoint(-1.0, bits=70)
    assert len(info.value.problems) == 2
    with pytest.raises(ConfigError):
        FixedPoint(1.0, bits=8, max_clients=200)


def test_non_finite_input_is_rejected() -> None:
    with pytest.raises(UpdateError):
        encode(np.array([0.0, np.nan]), FixedPoint(1.0))


@pytest.mark.parametrize("bits", [8, 12, 16, 32, 48])
def test_wire_round_trip(bits: int) -> None:
    v = np.random.default_rng(1).integers(0, 1 << bits, size=100, dtype=np.uint64)
    data = to_wire(v, bits)
    # The narrowest of 1, 2, 4 or 8 bytes that holds the ring: a narrow ring costs less on the wire.
    assert len(data) == 100 * (1 if bits <= 8 else 2 if bits <= 16 else 4 if bits <= 32 else 8)
    assert np.array_equal(from_wire(data, bits, 100), v)
    with pytest.raises(UpdateError):
        from_wire(data[:-1], bits, 100)
