"""Reduced rounds: which qualify, how the cohort is cut, and the ledger the parallel executor's workers
extend (fedloom.sim.reduce)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedloom.aggregators.registry import make_aggregator
from fedloom.algorithms.aggregate import weighted_mean
from fedloom.algorithms.api import ClientUpdate, ServerContext
from fedloom.algorithms.fedavg import FedAvg
from fedloom.algorithms.fednova import FedNova
from fedloom.algorithms.fedprox import FedProx
from fedloom.algorithms.scaffold import Scaffold
from fedloom.config.schema import ExperimentConfig
from fedloom.core.errors import UpdateError
from fedloom.core.params import Params
from fedloom.sim.build import build_algorithm
from fedloom.sim.executor import ClientFailure, torch_threads
from fedloom.sim.reduce import Ledger, contiguous_shares, not_reducible, slot_size
from fedloom.sim.server_round import apply_updates
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


def _update(cid: int, values: list[float], weight: float, *, dropped: bool = False) -> ClientUpdate:
    metrics = {"straggler": 1.0, "dropped": 1.0} if dropped else {}
    n = 0 if dropped else int(weight)
    delta = Params({"w": torch.tensor(values, dtype=torch.float32)})
    return ClientUpdate(
        client_id=cid, delta=delta, weight=weight, num_examples=n, num_steps=1, metrics=metrics
    )


def _ledger(*, slots: int, table: int) -> tuple[Ledger, list[torch.Tensor], list[str]]:
    like = [torch.zeros(2)]
    ledger = Ledger(slots, slot_size(like), table, threading.RLock())
    ledger.begin()
    return ledger, like, ["w"]


def _settle_in(ledger: Ledger, order: list[int], outcomes: list[object], like: list[torch.Tensor]) -> None:
    for i in order:
        with ledger.lock:
            slot = ledger.take()
        ledger.settle(i, slot, outcomes[i], like, ["w"])


@given(st.permutations(range(7)))
def test_the_ledger_sums_in_cohort_order_whatever_order_outcomes_settle_in(order: list[int]) -> None:
    # Weights and values chosen so that the float32 sum depends on its order.
    outcomes: list[object] = [
        _update(0, [1e8, 0.1], 3.0),
        ClientFailure(1, "raised"),
        _update(2, [1.0, 0.7], 7.0),
        _update(3, [5.0, 5.0], 0.0, dropped=True),
        _update(4, [-1e8, 0.3], 3.0),
        _update(5, [0.5, -0.2], 11.0),
        _update(6, [3.3, 1e-3], 1.0),
    ]
    ledger, like, names = _ledger(slots=7, table=7)
    _settle_in(ledger, order[:-1], outcomes, like)
    with pytest.raises(RuntimeError, match=r"passed [0-6] of 7 cohort positions"):
        ledger.result(outcomes, like, names)  # not every position is settled
    _settle_in(ledger, order[-1:], outcomes, like)
    got = ledger.result(outcomes, like, names)
    kept = [o for o in outcomes if isinstance(o, ClientUpdate) and not o.metrics.get("dropped")]
    want, total = weighted_mean(kept)
    assert got.delta.equal(want)
    assert (got.num_clients, got.total_weight) == (5, total) == (5, 25.0)
    # the definition: sum_i w_i * delta_i as one chain in cohort order, divided by sum_i w_i once
    chained = Params.weighted_sum([u.delta for u in kept], [u.weight for u in kept])
    assert torch.equal(got.delta["w"], chained["w"] / 25.0)
    # ... and the order matters for these values, so a chain in settling order would be caught
    shuffled = kept[1:] + kept[:1]
    other = Params.weighted_sum([u.delta for u in shuffled], [u.weight for u in shuffled])
    assert not torch.equal(other["w"], chained["w"])
    assert not any(ledger._busy)  # every slot is free once the chain has passed it


def test_a_ledger_of_only_failures_and_dropped_stragglers_is_an_empty_round() -> None:
    outcomes: list[object] = [ClientFailure(0, "raised"), _update(1, [1.0, 2.0], 0.0, dropped=True)]
    ledger, like, names = _ledger(slots=2, table=2)
    _settle_in(ledger, [1, 0], outcomes, like)
    got = ledger.result(outcomes, like, names)
    assert (got.num_clients, got.total_weight) == (0, 0.0)
    assert torch.equal(got.delta["w"], torch.zeros(2))


def test_an_update_with_no_slot_waits_for_the_chain_and_the_table_is_a_ring() -> None:
    # One slot and a two-entry table: position 2 cannot park while 0 is out (2 >= 0 + 2), and
    # position 1's update takes the only slot. Position 2 waits in another thread until position 0
    # settles; the chain then adds 0 and the parked 1, and position 2 adds itself.
    outcomes: list[object] = [_update(i, [1e8 if i == 0 else 1.0, i], 1.0 + i) for i in range(3)]
    ledger, like, names = _ledger(slots=1, table=2)
    _settle_in(ledger, [1], outcomes, like)
    waiting = threading.Thread(target=lambda: ledger.settle(2, -1, outcomes[2], like, ["w"]))
    waiting.start()
    waiting.join(0.2)
    assert waiting.is_alive()  # no slot, and outside the table: it waits
    ledger.settle(0, -1, outcomes[0], like, ["w"])
    waiting.join(5)
    assert not waiting.is_alive()
    got = ledger.result(outcomes, like, names)
    want, _ = weighted_mean([o for o in outcomes if isinstance(o, ClientUpdate)])
    assert got.delta.equal(want)


def test_an_experiment_files_default_aggregation_is_reduced_and_a_robust_one_is_not() -> None:
    assert not_reducible(build_algorithm(ExperimentConfig()), Pipeline()) is None
    cfg = ExperimentConfig.model_validate({"algorithm": {"name": "fedprox", "mu": 0.1}})
    assert not_reducible(build_algorithm(cfg), Pipeline()) is None
    cfg = ExperimentConfig.model_validate({"robust": {"aggregator": "median"}})
    assert "robust" in (not_reducible(build_algorithm(cfg), Pipeline()) or "")


@dataclass(frozen=True)
class _ThreadsSeen:
    """A server optimiser (plain ``params + delta``) that records torch's thread count when it steps."""

    seen: list[int]

    def init(self, params: Params) -> dict[str, Params]:
        return {}

    def step(
        self, params: Params, delta: Params, slots: Mapping[str, Params], round: int
    ) -> tuple[Params, Mapping[str, Params]]:
        self.seen.append(torch.get_num_threads())
        return params + delta, slots


def test_the_server_side_of_a_round_runs_with_one_torch_thread() -> None:
    seen: list[int] = []
    algorithm = FedAvg(server_optimizer=_ThreadsSeen(seen))
    state = algorithm.server_init(Params({"w": torch.zeros(3)}))
    update = _update(0, [1.0, 2.0, 4.0], 2.0)
    before = torch.get_num_threads()
    with torch_threads(2):
        new, _ = apply_updates(algorithm, Pipeline(), state, [update], ServerContext(0, 1, 1))
        assert torch.get_num_threads() == 2  # restored afterwards
    assert seen == [1]
    assert torch.equal(new.params["w"], torch.tensor([1.0, 2.0, 4.0]))
    assert torch.get_num_threads() == before


def test_an_update_that_is_not_the_models_shape_is_refused_by_name() -> None:
    ledger, like, _ = _ledger(slots=1, table=1)
    stray = ClientUpdate(
        client_id=4, delta=Params({"v": torch.zeros(2)}), weight=1.0, num_examples=1, num_steps=1, metrics={}
    )
    with pytest.raises(UpdateError, match=r"client 4's update has entries \['v'\], not the model's \['w'\]"):
        ledger.settle(0, -1, stray, like, ["w"])


def test_integer_entries_are_summed_in_floating_point_as_params_accumulate_does() -> None:
    # A model state with an integer buffer (BatchNorm's num_batches_tracked): the sum of w_i * x_i is
    # a float, exactly what weighted_mean computes; an integer sum would truncate or refuse the alpha.
    like = [torch.zeros(2), torch.zeros((), dtype=torch.int64)]
    ledger = Ledger(3, slot_size(like), 3, threading.RLock())
    ledger.begin()
    outcomes: list[object] = [
        ClientUpdate(
            client_id=i,
            delta=Params({"w": torch.tensor([0.1 * i, 1.0]), "n": torch.tensor(3 + i)}),
            weight=w,
            num_examples=1,
            num_steps=1,
            metrics={},
        )
        for i, w in enumerate([2.5, 1.25, 7.0])
    ]
    for i in (2, 0, 1):
        with ledger.lock:
            slot = ledger.take()
        ledger.settle(i, slot, outcomes[i], like, ["w", "n"])
    got = ledger.result(outcomes, like, ["w", "n"])
    want, _ = weighted_mean([o for o in outcomes if isinstance(o, ClientUpdate)])
    assert got.delta.equal(want)
    assert got.delta["n"].dtype == torch.float32


def test_an_update_whose_entry_has_another_dtype_or_shape_is_refused_by_name() -> None:
    ledger, like, _ = _ledger(slots=1, table=1)
    for bad in (torch.zeros(2, dtype=torch.float64), torch.zeros(3)):
        stray = ClientUpdate(
            client_id=5, delta=Params({"w": bad}), weight=1.0, num_examples=1, num_steps=1, metrics={}
        )
        with pytest.raises(UpdateError, match=r"client 5's update entry 'w' is .*, not the model's"):
            ledger.settle(0, 0, stray, like, ["w"])


@pytest.mark.parametrize("seed", range(6))
def test_threads_settling_at_random_moments_sum_in_cohort_order(seed: int) -> None:
    # Three threads claim positions as workers do, sleep a random while (training) and settle,
    # with two slots and a table of two: parking, waiting, draining and wrapping interleave.
    rng = random.Random(seed)
    n = 40
    outcomes: list[object] = [
        ClientFailure(i, "raised") if i % 11 == 5 else _update(i, [1e7 * (-1) ** i + i, 0.5 * i], 1.0 + i % 3)
        for i in range(n)
    ]
    sleeps = [rng.random() * 0.004 for _ in range(n)]
    like, names = [torch.zeros(2)], ["w"]

    class Poisoning(Ledger):
        """Fills a slot with NaN the moment it is taken, and reads slowly: a slot freed before the
        sum has read it would be caught spoiling the sum."""

        def take(self) -> int:
            slot = super().take()
            if slot >= 0:
                self.views(slot, like)[0].fill_(float("nan"))
            return slot

        def _add(self, tensors: list[torch.Tensor], weight: float, like: Sequence[torch.Tensor]) -> None:
            time.sleep(0.001)
            super()._add(tensors, weight, like)

    ledger = Poisoning(2, slot_size(like), 2, threading.RLock())
    ledger.begin()
    claim = [0]

    def worker() -> None:
        while True:
            with ledger.lock:
                pos = claim[0]
                claim[0] += 1
                slot = ledger.take() if pos < n else -1
            if pos >= n:
                return
            time.sleep(sleeps[pos])
            outcome = outcomes[pos]
            if slot >= 0 and isinstance(outcome, ClientUpdate):  # trained into the slot, as in a pool
                room = ledger.views(slot, like)
                room[0].copy_(outcome.delta["w"])
                outcome = replace(outcome, delta=Params({"w": room[0]}))
            ledger.settle(pos, slot, outcome, like, names)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    got = ledger.result(outcomes, like, names)
    want, _ = weighted_mean([o for o in outcomes if isinstance(o, ClientUpdate)])
    assert got.delta.equal(want)
    assert not any(ledger._busy)
