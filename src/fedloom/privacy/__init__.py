"""Client-level differential-privacy accounting (dp-accounting's RDP and PLD accountants)."""

from fedloom.privacy.accounting import (
    RDP_ORDERS,
    AccountantName,
    FixedSizeSampling,
    PoissonSampling,
    Sampling,
    dp_event,
    epsilon,
    local_epsilon,
)
from fedloom.privacy.budget import PrivacyLedger
from fedloom.privacy.calibrate import calibrate_noise_multiplier

__all__ = [
    "RDP_ORDERS",
    "AccountantName",
    "FixedSizeSampling",
    "PoissonSampling",
    "PrivacyLedger",
    "Sampling",
    "calibrate_noise_multiplier",
    "dp_event",
    "epsilon",
    "local_epsilon",
]
