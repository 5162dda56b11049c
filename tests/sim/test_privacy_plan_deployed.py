"""The deployed ledger credits amplification by sampling only where the selection is what it assumes."""

from __future__ import annotations

import pytest

from fedloom.config.loader import parse_config

pytest.importorskip("dp_accounting")

from fedloom.privacy.accounting import FixedSizeSampling, epsilon
from fedloom.sim.privacy_plan import plan_privacy


def _cfg(**deploy: object) -> dict[str, object]:
    return {
        "sampling": {"fraction": 0.5, "min_clients": 2},
        "data": {"num_clients": 8},
        "privacy": {"mode": "central", "clip_norm": 1.0, "noise_multiplier": 1.2},
        "deploy": deploy,
    }


@pytest.mark.parametrize(
    ("deploy", "reason"),
    [
        ({}, ""),
        ({"overselect": 1.5}, "deploy.overselect = 1.5"),
        ({"select_online": True}, "deploy.select_online"),
    ],
)
def test_deployed_plan_drops_amplification_for_overselection_and_online_selection(
    deploy: dict[str, object], reason: str
) -> None:
    plan = plan_privacy(parse_config(_cfg(**deploy)), deployed=True)
    assert plan is not None
    assert plan.cohort == 4
    if reason:
        assert reason in plan.no_amplification
        assert not plan.amplification
        assert plan.epsilon_after(3) == epsilon(1.2, FixedSizeSampling(4, 4), 3, plan.delta)
    else:
        assert plan.amplification
        assert plan.epsilon_after(3) == epsilon(1.2, FixedSizeSampling(4, 8), 3, plan.delta)
    simulated = plan_privacy(parse_config(_cfg(**deploy)))  # the simulation's sampling is uniform
    assert simulated is not None
    assert simulated.amplification
