"""Every executor gives the sequential executor's final model (bit for bit, or to 1e-5 for vmap)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.sim.conftest import mnist_config

from fedloom.algorithms.local import TrainContext
from fedloom.config.schema import ExperimentConfig
from fedloom.core.params import Params
from fedloom.data.datasets import ArrayDataset
from fedloom.results.store import RunStore
from fedloom.sim.build import Components, build_components, task_for
from fedloom.sim.executor import Executor, SequentialExecutor
from fedloom.sim.parallel import ParallelExecutor
from fedloom.sim.runner import STATE_DB, RunResult, run_simulation
from fedloom.sim.vectorized import VectorizedExecutor


def _final(cfg: ExperimentConfig, comps: Components, executor: Executor, out: Path) -> Params:
    return run_simulation(cfg, out, components=comps, executor=executor).state.params


# Per coordinate, each round's change of the model: the vectorised kernels sum in another order, so
# the models differ by float32 rounding (a few ulps of parameters below 1: measured 7e-9).
DELTA_ATOL = 1e-7


def _round_deltas(run_dir: Path, initial: Params) -> list[Params]:
    """Each round's change of the global model, from the run's per-round checkpoints."""
    with RunStore(run_dir / STATE_DB) as store:
        models = [initial] + [store.load_state(r).params for r in range(1, store.latest_round() + 1)]
    return [b - a for a, b in itertools.pairwise(models)]


@pytest.fixture(scope="module")
def reference_run(
    mnist_2nn: tuple[ExperimentConfig, Components], tmp_path_factory: pytest.TempPathFactory
) -> RunResult:
    cfg, comps = mnist_2nn
    seq = SequentialExecutor(comps.workspace, comps.train, comps.pipeline, threads=1)
    return run_simulation(cfg, tmp_path_factory.mktemp("seq") / "run", components=comps, executor=seq)


@pytest.fixture(scope="module")
def reference(reference_run: RunResult) -> Params:
    return reference_run.state.params


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_parallel_is_bit_identical(
    mnist_2nn: tuple[ExperimentConfig, Components], reference: Params, workers: int, tmp_path: Path
) -> None:
    cfg, comps = mnist_2nn
    with ParallelExecutor(comps.workspace, comps.train, comps.pipeline, workers=workers) as ex:
        got = _final(cfg, comps, ex, tmp_path / "run")
    assert got.equal(reference)


def test_vectorized_matches_to_float_tolerance(
    mnist_2nn: tuple[ExperimentConfig, Components], reference_run: RunResult, tmp_path: Path
) -> None:
    cfg, comps = mnist_2nn
    ex = VectorizedExecutor(comps.workspace, comps.train, comps.pipeline, block=4)
    got = run_simulation(cfg, tmp_path / "run", components=comps, executor=ex)
    assert got.state.params.allclose(reference_run.state.params, rtol=1e-5, atol=1e-7)
    # Round by round too: errors that cancel over rounds, or a round applied twice and one skipped,
    # would leave the final model close but not the rounds.
    want = _round_deltas(reference_run.run_dir, comps.initial_params)
    deltas = _round_deltas(got.run_dir, comps.initial_params)
    assert len(deltas) == len(want) == cfg.rounds
    for r, (d, w) in enumerate(zip(deltas, want, strict=True), start=1):
        assert w.l2_norm() > 0, r
        for k in w:
            err = float((d[k] - w[k]).abs().max())
            assert err <= DELTA_ATOL, (r, k, err)


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    """One local Ray instance for this file's Ray tests (starting Ray costs seconds each time)."""
    import ray

    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.usefixtures("ray_session")
def test_ray_is_bit_identical(
    mnist_2nn: tuple[ExperimentConfig, Components], reference: Params, tmp_path: Path
) -> None:
    from fedloom.sim.ray_executor import RayExecutor

    cfg, comps = mnist_2nn
    ex = RayExecutor(comps.workspace, comps.train, comps.pipeline, workers=2)
    try:
        got = _final(cfg, comps, ex, tmp_path / "run")
    finally:
        ex.close()
    assert got.equal(reference)


def _check_reduced_rounds(mnist_dir: str, weighting: str, make: Callable[[Components], Any]) -> None:
    """``make(comps)``'s ``run_round_reduced`` returns one aggregate, not the updates, and it is
    FedAvg.aggregate's over the sequential executor's updates to the bit."""
    from fedloom.algorithms.api import ClientUpdate, ServerContext

    # Dropped stragglers take no part; 12 of 30 clients per round; clients of unequal size, so the
    # two weightings give different means.
    cfg = mnist_config(
        mnist_dir,
        "algorithm.straggler_fraction=0.4",
        "algorithm.drop_stragglers=true",
        "sampling.fraction=0.4",
        "data.partition=dirichlet",
        "data.alpha=0.5",
        f"server.weighting={weighting}",
    )
    comps = build_components(cfg)
    alg = comps.algorithm
    state = alg.server_init(comps.initial_params)
    seq = SequentialExecutor(comps.workspace, comps.train, comps.pipeline, threads=1)
    ex = make(comps)
    try:
        for r in (1, 2):
            ctx = ServerContext(cfg.seed, r, comps.train.num_clients)
            cohort = [3, 4, 7, 8, 11, 15, 16, 20, 21, 25, 28, 29]
            want_out = seq.run_round(alg, alg.broadcast(state), cohort, {}, ctx)
            want = alg.aggregate([o for o in want_out if isinstance(o, ClientUpdate)], ctx)
            got_out, got = ex.run_round_reduced(alg, alg.broadcast(state), cohort, {}, ctx)
            assert got is not None
            assert [o.client_id for o in got_out] == [o.client_id for o in want_out]
            assert all(isinstance(o, ClientUpdate) and not o.delta for o in got_out)  # no delta came back
            assert sum(1 for o in want_out if o.metrics.get("dropped")) > 0, "no straggler was dropped"
            assert got.delta.equal(want.delta)
            weights = {o.weight for o in want_out if isinstance(o, ClientUpdate) and o.weight > 0}
            assert (weights == {1.0}) == (weighting == "uniform"), weights
            assert (got.num_clients, got.total_weight) == (want.num_clients, want.total_weight)
            state = alg.server_update(state, want, ctx)
    finally:
        ex.close()


@pytest.mark.parametrize("weighting", ["examples", "uniform"])
@pytest.mark.usefixtures("ray_session")
def test_ray_reduces_the_weighted_mean_on_its_workers_bit_identically(mnist_dir: str, weighting: str) -> None:
    from fedloom.sim.ray_executor import RayExecutor

    # 3 workers cut the chain twice
    _check_reduced_rounds(
        mnist_dir, weighting, lambda c: RayExecutor(c.workspace, c.train, c.pipeline, workers=3)
    )


@pytest.mark.parametrize(("weighting", "workers"), [("examples", 2), ("uniform", 3)])
def test_parallel_sums_the_weighted_mean_as_outcomes_arrive_bit_identically(
    mnist_dir: str, weighting: str, workers: int
) -> None:
    _check_reduced_rounds(
        mnist_dir, weighting, lambda c: ParallelExecutor(c.workspace, c.train, c.pipeline, workers=workers)
    )


def test_scaffold_client_states_flow_through_workers(mnist_dir: str, tmp_path: Path) -> None:
    # Half the clients each round, so clients come back with the control variates they kept.
    cfg = mnist_config(mnist_dir, "algorithm.name=scaffold", "data.num_clients=8", "sampling.fraction=0.5")
    comps = build_components(cfg)
    seq = SequentialExecutor(comps.workspace, comps.train, comps.pipeline, threads=1)
    want = run_simulation(cfg, tmp_path / "seq", components=comps, executor=seq).state
    with ParallelExecutor(comps.workspace, comps.train, comps.pipeline, workers=2) as ex:
        got = run_simulation(cfg, tmp_path / "par", components=comps, executor=ex).state
    assert got.params.equal(want.params)
    assert got.algo_state["control"].equal(want.algo_state["control"])


def test_fedprox_with_stragglers_vectorized(mnist_dir: str, tmp_path: Path) -> None:
    cfg = mnist_config(
        mnist_dir, "algorithm.name=fedprox", "algorithm.mu=0.1", "algorithm.straggler_fraction=0.5"
    )
    comps = build_components(cfg)
    seq = SequentialExecutor(comps.workspace, comps.train, comps.pipeline)
    want = _final(cfg, comps, seq, tmp_path / "seq")
    got = _final(
        cfg, comps, VectorizedExecutor(comps.workspace, comps.train, comps.pipeline), tmp_path / "vec"
    )
    assert got.allclose(want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("algorithm", ["fednova", "scaffold", "scaffold-I"])
def test_fednova_and_scaffold_vectorize_to_float_tolerance(
    algorithm: str, mnist_dir: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Half the clients each round with stragglers, so SCAFFOLD clients come back with the control
    # variates they kept (stacked per block as c - c_i) and some run fewer steps (c_i+ divides by K_i).
    # Option I's c_i+ is the full gradient at x, computed by the plan's finish after batched training.
    name, _, option = algorithm.partition("-")
    cfg = mnist_config(
        mnist_dir,
        f"algorithm.name={name}",
        f"algorithm.scaffold_option={option or 'II'}",
        "data.num_clients=8",
        "sampling.fraction=0.5",
        "algorithm.straggler_fraction=0.5",
    )
    comps = build_components(cfg)
    seq = SequentialExecutor(comps.workspace, comps.train, comps.pipeline, threads=1)
    want = run_simulation(cfg, tmp_path / "seq", components=comps, executor=seq)
    ex = VectorizedExecutor(comps.workspace, comps.train, comps.pipeline, block=3)
    with caplog.at_level(logging.WARNING, logger="fedloom"):
        got = run_simulation(cfg, tmp_path / "vec", components=comps, executor=ex)
    assert not [r for r in caplog.records if "sequentially" in r.getMessage()]  # really batched
    assert got.state.params.allclose(want.state.params, rtol=1e-5, atol=1e-7)
    for name, value in want.state.algo_state.items():  # SCAFFOLD's server control variate
        assert got.state.algo_state[name].allclose(value, rtol=1e-4, atol=1e-6), name
    with RunStore(want.run_dir / STATE_DB) as a, RunStore(got.run_dir / STATE_DB) as b:
        want_states, got_states = a.client_states(), b.client_states()
    assert sorted(got_states) == sorted(want_states)
    for cid, st in want_states.items():
        for name, value in st.values.items():
            assert got_states[cid].values[name].allclose(value, rtol=1e-4, atol=1e-6), (cid, name)
    assert bool(want_states) == algorithm.startswith("scaffold")


def test_vectorized_falls_back_with_one_log_line(
    mnist_dir: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A task with its own training function runs sequentially, said once for the whole run."""

    def loop(model: torch.nn.Module, data: ArrayDataset, ctx: TrainContext) -> dict[str, float]:
        opt = ctx.optimizer()
        for xb, yb in ctx.batches():
            opt.zero_grad()
            ctx.loss_fn(model(xb), yb).backward()
            opt.step()
        return {}

    cfg = mnist_config(mnist_dir, "algorithm.name=fedprox", "algorithm.mu=0.1", "rounds=2")
    comps = build_components(cfg, task=replace(task_for(cfg), train=loop))
    seq = SequentialExecutor(comps.workspace, comps.train, comps.pipeline)
    want = _final(cfg, comps, seq, tmp_path / "seq")
    with caplog.at_level(logging.WARNING, logger="fedloom"):
        ex = VectorizedExecutor(comps.workspace, comps.train, comps.pipeline)
        got = _final(cfg, comps, ex, tmp_path / "vec")
    assert got.equal(want)
    assert not got.equal(comps.initial_params)
    lines = [r.getMessage() for r in caplog.records if r.name == "fedloom"]
    assert lines == [
        "vectorized executor: running clients sequentially: the task trains with its own training function"
    ]


def test_thread_count_is_restored(mnist_2nn: tuple[ExperimentConfig, Components]) -> None:
    before = torch.get_num_threads()
    _cfg, comps = mnist_2nn
    algo = comps.algorithm
    from fedloom.algorithms.api import ServerContext

    SequentialExecutor(comps.workspace, comps.train, comps.pipeline, threads=1).run_round(
        algo, algo.broadcast(algo.server_init(comps.initial_params)), [0], {}, ServerContext(0, 1, 30)
    )
    assert torch.get_num_threads() == before


def test_uniform_weighting_vectorizes_like_sequential(mnist_dir: str, tmp_path: Path) -> None:
    # Clients of unequal size (Dirichlet), FedAdam as published: the uniform mean of the deltas.
    sets = ("data.partition=dirichlet", "data.alpha=0.3", "server.optimizer=adam", "server.lr=0.01")
    cfg = mnist_config(mnist_dir, *sets, "server.weighting=uniform")
    comps = build_components(cfg)
    seq = SequentialExecutor(comps.workspace, comps.train, comps.pipeline, threads=1)
    want = _final(cfg, comps, seq, tmp_path / "seq")
    got = _final(
        cfg, comps, VectorizedExecutor(comps.workspace, comps.train, comps.pipeline), tmp_path / "vec"
    )
    assert got.allclose(want, rtol=1e-5, atol=1e-7)
    cfg_ex = mnist_config(mnist_dir, *sets)
    comps_ex = build_components(cfg_ex)
    seq_ex = SequentialExecutor(comps_ex.workspace, comps_ex.train, comps_ex.pipeline, threads=1)
    by_examples = _final(cfg_ex, comps_ex, seq_ex, tmp_path / "ex")
    assert not by_examples.allclose(want, rtol=1e-3, atol=1e-5)  # the weighting took effect
