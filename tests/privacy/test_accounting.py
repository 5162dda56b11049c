"""Accounting equals dp-accounting's direct computation; calibration never overshoots."""

from __future__ import annotations

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp
from dp_accounting.rdp import rdp_privacy_accountant
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.privacy import (
    RDP_ORDERS,
    FixedSizeSampling,
    PoissonSampling,
    PrivacyLedger,
    calibrate_noise_multiplier,
    epsilon,
    local_epsilon,
)

NR = dp_accounting.NeighboringRelation


def _direct_rdp_poisson(q: float, sigma: float, steps: int, delta: float) -> float:
    acc = rdp.RdpAccountant(orders=list(RDP_ORDERS))
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return float(acc.get_epsilon(delta))


@pytest.mark.parametrize(("q", "sigma", "steps", "delta"), [(0.1, 1.0, 100, 1e-5), (0.01, 0.8, 1000, 1e-6)])
def test_rdp_poisson_matches_dp_accounting(q: float, sigma: float, steps: int, delta: float) -> None:
    assert epsilon(sigma, PoissonSampling(q), steps, delta) == pytest.approx(
        _direct_rdp_poisson(q, sigma, steps, delta), rel=1e-12
    )


def test_rdp_fixed_size_matches_dp_accounting_with_replace_one_sensitivity() -> None:
    # Replace-one neighbours move the clipped sum by up to 2C: the accountant sees sigma / 2.
    acc = rdp.RdpAccountant(orders=list(RDP_ORDERS), neighboring_relation=NR.REPLACE_ONE)
    event = dp_accounting.SampledWithoutReplacementDpEvent(100, 10, dp_accounting.GaussianDpEvent(1.5))
    acc.compose(event, 50)
    got = epsilon(3.0, FixedSizeSampling(cohort=10, population=100), 50, 1e-5)
    assert got == pytest.approx(float(acc.get_epsilon(1e-5)), rel=1e-12)


def test_pld_poisson_matches_dp_accounting() -> None:
    acc = pld.PLDAccountant(value_discretization_interval=1e-3)
    acc.compose(dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.1)), 200)
    got = epsilon(1.1, PoissonSampling(0.05), 200, 1e-5, accountant="pld", pld_discretization=1e-3)
    assert got == pytest.approx(float(acc.get_epsilon(1e-5)), rel=1e-12)
    # PLD is tighter than RDP for the same mechanism.
    assert got < epsilon(1.1, PoissonSampling(0.05), 200, 1e-5)


def test_pld_refuses_fixed_size_sampling() -> None:
    with pytest.raises(ValueError, match="FixedSizeSampling"):
        epsilon(1.0, FixedSizeSampling(10, 100), 10, 1e-5, accountant="pld")


def test_local_epsilon_matches_gaussian_composition() -> None:
    acc = rdp.RdpAccountant(orders=list(RDP_ORDERS))
    acc.compose(dp_accounting.GaussianDpEvent(5.0), 20)
    assert local_epsilon(10.0, 20, 1e-5) == pytest.approx(float(acc.get_epsilon(1e-5)), rel=1e-12)
    assert local_epsilon(10.0, 0, 1e-5) == 0.0


def test_zero_rounds_cost_nothing_and_bad_arguments_are_named() -> None:
    assert epsilon(1.0, PoissonSampling(0.1), 0, 1e-5) == 0.0
    with pytest.raises(ValueError, match="noise_multiplier"):
        epsilon(0.0, PoissonSampling(0.1), 1, 1e-5)
    with pytest.raises(ValueError, match="delta"):
        epsilon(1.0, PoissonSampling(0.1), 1, 1.5)
    with pytest.raises(ValueError, match="rate"):
        PoissonSampling(1.5)
    with pytest.raises(ValueError, match="cohort"):
        FixedSizeSampling(cohort=11, population=10)


@settings(max_examples=12, deadline=None)
@given(
    target=st.floats(0.5, 8.0),
    q=st.sampled_from([0.01, 0.05, 0.1]),
    rounds=st.integers(1, 300),
    fixed=st.booleans(),
)
def test_calibrated_sigma_never_overshoots(target: float, q: float, rounds: int, fixed: bool) -> None:
    # Both schemes the runner can sample with: Poisson, and the fixed-size cohort (the default).
    sampling = FixedSizeSampling(round(q * 1000), 1000) if fixed else PoissonSampling(q)
    sigma = calibrate_noise_multiplier(target, 1e-5, rounds, sampling, rtol=1e-2)
    assert epsilon(sigma, sampling, rounds, 1e-5) <= target
    if sigma > 1e-2:  # not clamped at min_noise: a little less noise would overshoot
        assert epsilon(sigma * (1 - 2.5e-2), sampling, rounds, 1e-5) > target


@settings(max_examples=4, deadline=None)
@given(target=st.floats(1.0, 6.0), q=st.sampled_from([0.05, 0.1]), rounds=st.integers(1, 60))
def test_calibrated_sigma_never_overshoots_with_pld(target: float, q: float, rounds: int) -> None:
    sampling = PoissonSampling(q)
    sigma = calibrate_noise_multiplier(
        target, 1e-5, rounds, sampling, accountant="pld", pld_discretization=1e-3, rtol=2e-2
    )
    assert epsilon(sigma, sampling, rounds, 1e-5, accountant="pld", pld_discretization=1e-3) <= target


def test_calibration_with_pld_and_fixed_size() -> None:
    s = calibrate_noise_multiplier(
        3.0, 1e-5, 50, PoissonSampling(0.1), accountant="pld", pld_discretization=1e-3, rtol=2e-2
    )
    assert epsilon(s, PoissonSampling(0.1), 50, 1e-5, accountant="pld", pld_discretization=1e-3) <= 3.0
    fixed = FixedSizeSampling(10, 100)
    s2 = calibrate_noise_multiplier(4.0, 1e-5, 20, fixed, rtol=5e-2)
    assert epsilon(s2, fixed, 20, 1e-5) <= 4.0


def test_calibration_reports_unreachable_targets() -> None:
    with pytest.raises(ValueError, match="no noise multiplier"):
        calibrate_noise_multiplier(1e-4, 1e-5, 10, PoissonSampling(1.0), max_noise=50.0)


def test_ledger_stops_before_the_budget() -> None:
    ledger = PrivacyLedger(noise_multiplier=1.0, sampling=PoissonSampling(0.1), delta=1e-5)
    eps = [ledger.epsilon_after(r) for r in range(0, 40, 5)]
    assert eps == sorted(eps)
    assert eps[0] == 0.0
    budget = ledger.epsilon_after(17) + 1e-9
    assert ledger.max_rounds(budget) == 17
    assert not ledger.would_exceed(budget, 17)
    assert ledger.would_exceed(budget, 18)


@pytest.mark.parametrize(
    ("q", "sigma", "steps", "delta"),
    [(0.01, 0.5, 100, 1e-5), (0.1, 1.1, 100, 1e-5), (0.001, 0.8, 10_000, 1e-6), (1.0, 1.0, 10, 1e-5)],
)
def test_rdp_is_never_looser_than_dp_accounting_default_orders(
    q: float, sigma: float, steps: int, delta: float
) -> None:
    # dp-accounting's own accountant with its default orders, built here: fedloom's ε must not exceed it.
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    reference = float(acc.get_epsilon(delta))
    got = epsilon(sigma, PoissonSampling(q), steps, delta)
    assert got <= reference * (1 + 1e-12)
    assert got == pytest.approx(reference, rel=1e-3)


def test_unsampled_gaussian_matches_the_closed_form_rdp_curve() -> None:
    # T compositions of the Gaussian mechanism with noise multiplier sigma have RDP
    # eps(alpha) = T * alpha / (2 sigma^2) (Mironov 2017, Prop. 7 and Prop. 1); convert it to
    # (eps, delta) with dp-accounting's conversion over a fine grid of orders.
    sigma, steps, delta = 4.0, 50, 1e-5
    fine = np.concatenate([np.arange(1.01, 11.0, 0.01), np.arange(11.0, 1025.0, 0.5)])
    default = rdp_privacy_accountant.DEFAULT_RDP_ORDERS
    closed_default = rdp_privacy_accountant.compute_epsilon(
        default, [steps * a / (2 * sigma**2) for a in default], delta
    )[0]
    closed_fine = rdp_privacy_accountant.compute_epsilon(
        fine, [steps * a / (2 * sigma**2) for a in fine], delta
    )[0]
    got = epsilon(sigma, PoissonSampling(1.0), steps, delta)
    assert got <= closed_default * (1 + 1e-12)
    assert got == pytest.approx(closed_fine, rel=5e-3)
    # Local DP: each message has sensitivity 2C, so the curve is that of noise multiplier sigma / 2.
    local_closed = rdp_privacy_accountant.compute_epsilon(
        fine, [steps * a / (2 * (sigma / 2) ** 2) for a in fine], delta
    )[0]
    assert local_epsilon(sigma, steps, delta) == pytest.approx(local_closed, rel=5e-3)
