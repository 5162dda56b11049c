"""Worker-side reduction: which rounds qualify and how the cohort is cut (fedloom.sim.reduce)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedloom.aggregators.registry import make_aggregator
from fedloom.algorithms.fedavg import FedAvg
from fedloom.algorithms.fednova import FedNova
from fedloom.algorithms.fedprox import FedProx
from fedloom.algorithms.scaffold import Scaffold
from fedloom.sim.reduce import contiguous_shares, not_reducible
from fedloom.transforms.pipeline import NormClip, Pipeline


@given(st.lists(st.integers(1, 50), max_size=40), st.integers(1, 6))
def test_contiguous_shares_cover_the_cohort_in_order_and_balance_cost(costs: list[int], workers: int) -> None:
    shares = contiguous_shares(costs, workers)
    assert len(shares) == workers
    assert [i for s in shares for i in s] == list(range(len(costs)))  # consecutive runs, in order
    assert shares == contiguous_shares(costs, workers)  # deterministic
    if len(costs) >= workers:
        assert all(shares), shares  # nobody idles while there is work
        loads = [sum(costs[i] for i in s) for s in shares]
        # Greedy cuts at the ideal boundaries: no run exceeds the ideal share by more than two items.
        assert max(loads) <= sum(costs) / workers + 2 * max(costs)


def test_only_a_plain_weighted_mean_on_raw_updates_is_reduced_on_workers() -> None:
    assert not_reducible(FedAvg(), Pipeline()) is None
    assert not_reducible(FedAvg(weighting="uniform"), Pipeline()) is None  # the weight travels on the update
    assert not_reducible(FedProx(mu=0.1), Pipeline()) is None
    assert not_reducible(FedProx(weighting="uniform", aggregator=make_aggregator("median")), Pipeline())
    assert "own rule" in (not_reducible(Scaffold(), Pipeline()) or "")
    assert not_reducible(FedNova(), Pipeline()) == "FedNova aggregates with its own rule"
    robust = FedAvg(aggregator=make_aggregator("median"))
    assert "robust" in (not_reducible(robust, Pipeline()) or "")
    assert "decode" in (not_reducible(FedAvg(), Pipeline((NormClip(1.0),))) or "")


@dataclass(frozen=True)
class _Declared:
    """Not one of fedloom's algorithms: it declares (or refuses) the weighted mean itself."""

    refusal: str | None

    def why_not_weighted_mean(self) -> str | None:
        return self.refusal


def test_the_algorithm_declares_whether_its_aggregate_is_the_weighted_mean() -> None:
    assert not_reducible(_Declared(None), Pipeline()) is None  # type: ignore[arg-type]
    assert not_reducible(_Declared("it trims"), Pipeline()) == "it trims"  # type: ignore[arg-type]
    assert "decode" in (not_reducible(_Declared(None), Pipeline((NormClip(1.0),))) or "")  # type: ignore[arg-type]


def test_contiguous_shares_refuses_no_workers() -> None:
    with pytest.raises(ValueError, match="workers must be >= 1"):
        contiguous_shares([1, 2], 0)
