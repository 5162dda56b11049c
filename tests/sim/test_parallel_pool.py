"""The parallel pool's scheduling, error handling and lifetime; the executor factory."""

from __future__ import annotations

import itertools
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from tests.sim.conftest import mnist_config

from fedloom.algorithms.api import Broadcast, ClientUpdate, ServerContext, Workspace
from fedloom.algorithms.fedavg import FedAvg
from fedloom.config import load_config
from fedloom.config.schema import ExperimentConfig
from fedloom.core.errors import ConfigError
from fedloom.core.params import Params
from fedloom.data.datasets import ArrayDataset
from fedloom.data.federated import PartitionedDataset
from fedloom.sim.auto import choose_executor, make_executor
from fedloom.sim.build import Components
from fedloom.sim.executor import (
    ClientFailure,
    ExecutorError,
    SequentialExecutor,
    close_executor,
    lpt_assign,
)
from fedloom.sim.parallel import ParallelExecutor
from fedloom.transforms.pipeline import Pipeline


def test_lpt_balances_deterministically() -> None:
    costs = [7, 3, 3, 5, 1, 9, 2]
    shares = lpt_assign(costs, 3)
    assert sorted(i for s in shares for i in s) == list(range(len(costs)))
    loads = [sum(costs[i] for i in s) for s in shares]
    assert max(loads) - min(loads) <= max(costs)
    assert shares == lpt_assign(costs, 3)
    assert lpt_assign([1, 1], 4) == [[0], [1], [], []]


@pytest.mark.parametrize(
    ("requested", "workers", "cohort", "cores", "cuda", "kind"),
    [
        ("auto", 0, 100, 1, False, "sequential"),
        ("auto", 0, 3, 2, False, "sequential"),
        ("auto", 0, 100, 2, False, "parallel"),
        ("auto", 0, 100, 2, True, "vectorized"),
        ("sequential", 0, 100, 8, True, "sequential"),
        ("parallel", 3, 2, 1, False, "parallel"),
    ],
)
def test_auto_choice(requested: str, workers: int, cohort: int, cores: int, cuda: bool, kind: str) -> None:
    choice = choose_executor(requested, workers, cohort, cores=cores, cuda=cuda)
    assert choice.kind == kind
    assert choice.reason
    if kind == "parallel":
        assert choice.workers == (workers or cores)


def test_config_keys_and_factory(mnist_2nn: tuple[ExperimentConfig, Components]) -> None:
    assert load_config(None, []).executor == "auto"
    cfg = load_config(None, ["executor=parallel", "workers=3"])
    assert (cfg.executor, cfg.workers) == ("parallel", 3)
    with pytest.raises(ConfigError, match="executor"):
        load_config(None, ["executor=threads"])
    _, comps = mnist_2nn
    ex = make_executor(cfg, comps)
    assert isinstance(ex, ParallelExecutor)
    assert ex.workers == 3
    close_executor(ex)
    assert isinstance(make_executor(load_config(None, ["executor=sequential"]), comps), SequentialExecutor)


@dataclass(frozen=True)
class _Killer(FedAvg):
    """FedAvg whose client 0 kills its own process (a worker crash)."""

    def client_update(self, workspace, broadcast, client_state, data, ctx) -> ClientUpdate:  # type: ignore[no-untyped-def]
        if ctx.client_id == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().client_update(workspace, broadcast, client_state, data, ctx)


@dataclass(frozen=True)
class _Buggy(FedAvg):
    """FedAvg with a bug (an unexpected exception) on client 0."""

    def client_update(self, workspace, broadcast, client_state, data, ctx) -> ClientUpdate:  # type: ignore[no-untyped-def]
        if ctx.client_id == 0:
            raise ZeroDivisionError("bug in client code")
        return super().client_update(workspace, broadcast, client_state, data, ctx)


@dataclass(frozen=True)
class _Slow(FedAvg):
    """FedAvg whose client 0 takes a second; every update names the process that trained it."""

    def client_update(self, workspace, broadcast, client_state, data, ctx) -> ClientUpdate:  # type: ignore[no-untyped-def]
        if ctx.client_id == 0:
            time.sleep(1.0)
        u = super().client_update(workspace, broadcast, client_state, data, ctx)
        return replace(u, metrics={**u.metrics, "pid": float(os.getpid())})


def _slow_round(
    comps: Components, size: int
) -> tuple[_Slow, ServerContext, Broadcast, list[int], SequentialExecutor]:
    """A first round of ``_Slow`` over clients ``0..size-1``, and the sequential reference executor."""
    algo = _Slow()
    ctx = ServerContext(seed=0, round=1, population=comps.train.num_clients)
    reference = SequentialExecutor(comps.workspace, comps.train, comps.pipeline, threads=1)
    return algo, ctx, algo.broadcast(algo.server_init(comps.initial_params)), list(range(size)), reference


def _assert_same_updates(got: Sequence[object], want: Sequence[object]) -> None:
    """Every outcome is an update, and each delta equals the reference's bit for bit."""
    for ours, theirs in zip(got, want, strict=True):
        assert isinstance(ours, ClientUpdate)
        assert isinstance(theirs, ClientUpdate)
        assert ours.delta.equal(theirs.delta)


def test_a_free_worker_takes_the_next_client(mnist_2nn: tuple[ExperimentConfig, Components]) -> None:
    # Equal clients split evenly in advance would leave 5 of the 11 quick ones waiting behind client 0.
    _, comps = mnist_2nn
    algo, ctx, bc, cohort, reference = _slow_round(comps, 12)
    with ParallelExecutor(comps.workspace, comps.train, comps.pipeline, workers=2) as ex:
        got = ex.run_round(algo, bc, cohort, {}, ctx)
    assert [o.client_id for o in got] == cohort
    pids = [o.metrics["pid"] for o in got if isinstance(o, ClientUpdate)]
    assert len(pids) == 12
    assert pids.count(pids[0]) == 1  # the worker on client 0 was busy while the other took all the rest
    _assert_same_updates(got, reference.run_round(algo, bc, cohort, {}, ctx))


def test_a_reduced_round_parks_what_finishes_early_and_sums_in_cohort_order(
    mnist_2nn: tuple[ExperimentConfig, Components],
) -> None:
    # Client 0 holds the chain at position 0 for a second while the other worker trains every other
    # client: each of those updates is parked in its own slot of the ledger until the chain reaches
    # it, and nothing makes that worker wait. The sum must still be the reference, bit for bit.
    _, comps = mnist_2nn
    algo, ctx, bc, cohort, reference = _slow_round(comps, comps.train.num_clients)
    want = algo.aggregate(
        [o for o in reference.run_round(algo, bc, cohort, {}, ctx) if isinstance(o, ClientUpdate)], ctx
    )
    with ParallelExecutor(comps.workspace, comps.train, comps.pipeline, workers=2) as ex:
        for _ in range(2):  # the second round reuses the slots the first one filled
            outcomes, got = ex.run_round_reduced(algo, bc, cohort, {}, ctx)
            assert got is not None
            assert got.delta.equal(want.delta)
            assert (got.num_clients, got.total_weight) == (want.num_clients, want.total_weight)
            pids = [o.metrics["pid"] for o in outcomes if isinstance(o, ClientUpdate)]
            assert pids.count(pids[0]) == 1  # one worker trained the other 29 while position 0 was out
            assert all(not isinstance(o, ClientUpdate) or not o.delta for o in outcomes)  # no delta came back


def test_a_reduced_round_with_too_few_slots_waits_for_the_chain_and_stays_exact(
    mnist_2nn: tuple[ExperimentConfig, Components], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A pool sized for a cohort of 1 has one slot and (with a table of 2) parks within two positions
    # of the chain: while client 0 trains for a second, the other worker has nowhere to park and
    # waits, and the ring table is reused many times over. The sum must still be the reference.
    import fedloom.sim.parallel as parallel

    monkeypatch.setattr(parallel, "MIN_TABLE", 2)
    _, comps = mnist_2nn
    algo, ctx, bc, cohort, reference = _slow_round(comps, comps.train.num_clients)
    want = algo.aggregate(
        [o for o in reference.run_round(algo, bc, cohort, {}, ctx) if isinstance(o, ClientUpdate)], ctx
    )
    with ParallelExecutor(comps.workspace, comps.train, comps.pipeline, workers=2) as ex:
        ex.start(1)
        assert ex._ledger is not None
        assert (ex._ledger.slots, ex._ledger.table) == (1, 2)
        outcomes, got = ex.run_round_reduced(algo, bc, cohort, {}, ctx)
    assert got is not None
    assert got.delta.equal(want.delta)
    pids = [o.metrics["pid"] for o in outcomes if isinstance(o, ClientUpdate)]
    assert pids.count(pids[0]) > 1  # the worker on client 0 took more once the other one had waited


def test_worker_death_is_a_clear_error(mnist_2nn: tuple[ExperimentConfig, Components]) -> None:
    _, comps = mnist_2nn
    algo = _Killer()
    ex = ParallelExecutor(comps.workspace, comps.train, comps.pipeline, workers=2)
    ctx = ServerContext(seed=0, round=1, population=comps.train.num_clients)
    bc = algo.broadcast(algo.server_init(comps.initial_params))
    try:
        with pytest.raises(ExecutorError, match=r"died .*signal 9"):
            ex.run_round(algo, bc, [0, 1, 2, 3], {}, ctx)
    finally:
        ex.close()
    assert not ex._procs


def test_a_round_the_main_process_abandons_takes_the_pool_with_it(
    mnist_2nn: tuple[ExperimentConfig, Components],
) -> None:
    # Workers left inside a round would read the next round's message region with this round's work.
    _, comps = mnist_2nn
    algo = FedAvg()
    ctx = ServerContext(seed=0, round=1, population=comps.train.num_clients)
    bc = algo.broadcast(algo.server_init(comps.initial_params))

    def fail() -> None:
        raise RuntimeError("the previous round's commit failed")

    with ParallelExecutor(comps.workspace, comps.train, comps.pipeline, workers=2) as ex:
        ex.on_dispatch = fail
        with pytest.raises(RuntimeError, match="commit failed"):
            ex.run_round(algo, bc, [0, 1, 2, 3], {}, ctx)
        assert not ex._procs  # the pool was shut down
        ex.on_dispatch = None
        got = ex.run_round(algo, bc, [0, 1, 2, 3], {}, ctx)  # a fresh pool serves the next round
    want = SequentialExecutor(comps.workspace, comps.train, comps.pipeline, threads=1).run_round(
        algo, bc, [0, 1, 2, 3], {}, ctx
    )
    _assert_same_updates(got, want)


def test_a_worker_that_died_holding_the_shared_lock_is_named_not_waited_for(
    mnist_2nn: tuple[ExperimentConfig, Components],
) -> None:
    import multiprocessing as mp

    _, comps = mnist_2nn
    ctx = ServerContext(seed=0, round=1, population=comps.train.num_clients)
    with ParallelExecutor(comps.workspace, comps.train, comps.pipeline, workers=2) as ex:
        ex.start(4)
        assert ex._claim is not None
        lock = ex._claim.get_lock()
        # A process that takes the lock and never gives it back, as a worker killed inside it would.
        holder = mp.get_context("fork").Process(target=lambda: (lock.acquire(), time.sleep(60)), daemon=True)
        holder.start()
        time.sleep(0.5)
        victim = ex._procs[0].pid
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        try:
            with pytest.raises(ExecutorError, match=r"worker 0 .*died .*signal 9"), ex._shared(ctx):
                pass
        finally:
            holder.kill()
            holder.join()


def test_an_exception_in_client_code_fails_that_client_only(
    mnist_2nn: tuple[ExperimentConfig, Components],
) -> None:
    _, comps = mnist_2nn
    algo = _Buggy()
    ctx = ServerContext(seed=0, round=1, population=comps.train.num_clients)
    bc = algo.broadcast(algo.server_init(comps.initial_params))
    with ParallelExecutor(comps.workspace, comps.train, comps.pipeline, workers=2) as ex:
        got = ex.run_round(algo, bc, [0, 1, 2, 3], {}, ctx)
        alive = list(ex._procs)
    assert [o.client_id for o in got] == [0, 1, 2, 3]
    assert isinstance(got[0], ClientFailure)
    assert "round 1, client 0: client code raised ZeroDivisionError: bug in client code" in got[0].reason
    assert all(isinstance(o, ClientUpdate) for o in got[1:])
    assert len(alive) == 2  # the pool lives on


def test_run_simulation_default_executor_closes_its_pool(mnist_dir: str, tmp_path: object) -> None:
    from pathlib import Path

    from fedloom.sim.runner import run_simulation

    cfg = mnist_config(mnist_dir, "rounds=1", "executor=parallel", "workers=2")
    before = {p for p in os.listdir("/proc") if p.isdigit()}
    run_simulation(cfg, Path(str(tmp_path)) / "run")
    children = [
        p for p in os.listdir("/proc")
        if p.isdigit() and p not in before and _ppid(p) == os.getpid()
    ]  # fmt: skip
    assert children == []


def _ppid(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def test_auto_falls_back_to_sequential_without_fork() -> None:
    choice = choose_executor("auto", 0, 100, cores=4, cuda=False, fork=False)
    assert choice.kind == "sequential"
    assert "fork" in choice.reason


def test_the_task_optimisers_machinery_is_imported_once_before_the_fork() -> None:
    """A first ``torch.optim`` step imports ~800 modules (~80 MB); the pool takes one in the parent
    before forking, so the workers share those pages instead of each importing them."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from torch import nn\n"
        "from fedloom import ArrayDataset, ClientData, LocalOptimizer, Task\n"
        "from fedloom.sim.parallel import ParallelExecutor\n"
        "from fedloom.tasks import PartitionSpec, materialise\n"
        "from fedloom.transforms.pipeline import Pipeline\n"
        "data = ClientData(train=[ArrayDataset(torch.zeros(4, 3), torch.tensor([0, 1, 0, 1]))])\n"
        "task = Task(model=lambda: nn.Linear(3, 2), data=data, optimizer=LocalOptimizer(torch.optim.Adam))\n"
        "m = materialise(task, seed=0, split=PartitionSpec())\n"
        "before = 'torch._dynamo' in sys.modules\n"
        "with ParallelExecutor(m.workspace, m.train, Pipeline(()), workers=1) as ex:\n"
        "    ex.start(1)\n"
        "    print(before, 'torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.split() == ["False", "True"]


def test_a_model_with_an_integer_buffer_is_summed_on_the_pool_as_fedavg_aggregates() -> None:
    # BatchNorm's num_batches_tracked is an int64 entry of the model's state: the workers' sum takes
    # it in floating point, as FedAvg.aggregate over the sequential executor's updates does.
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    base = ArrayDataset(torch.randn(150, 4, generator=g), torch.randint(0, 3, (150,), generator=g), 3)
    bounds = [0, 12, 30, 41, 60, 84, 97, 120, 150]  # clients of unequal size
    data = PartitionedDataset(base, [np.arange(a, b) for a, b in itertools.pairwise(bounds)])
    ws, pipeline, algo = Workspace(module), Pipeline(), FedAvg()
    assert module.state_dict()["1.num_batches_tracked"].dtype == torch.int64
    bc = algo.broadcast(algo.server_init(Params.from_module(module)))
    ctx = ServerContext(seed=0, round=1, population=data.num_clients)
    cohort = list(range(data.num_clients))
    updates = SequentialExecutor(ws, data, pipeline, threads=1).run_round(algo, bc, cohort, {}, ctx)
    want = algo.aggregate([u for u in updates if isinstance(u, ClientUpdate)], ctx)
    with ParallelExecutor(ws, data, pipeline, workers=2) as ex:
        _, got = ex.run_round_reduced(algo, bc, cohort, {}, ctx)
    assert got is not None
    assert got.delta.equal(want.delta)
    assert got.delta["1.num_batches_tracked"].dtype == want.delta["1.num_batches_tracked"].dtype


_FRAGMENTED_HEAP = """
import torch
from fedloom.sim.parallel import _malloc_trim

def resident_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("RssAnon"))

blocks = [torch.ones(15_000) for _ in range(3_000)]  # 180 MB in 60 kB blocks: heap, not mmap
pin = torch.ones(300)
held = resident_mb()
del blocks
freed = resident_mb()
_malloc_trim()()
print(held, freed, resident_mb())
"""


@pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
    reason="malloc_trim is glibc's (elsewhere a no-op)",
)
def test_malloc_trim_returns_the_heaps_freed_pages() -> None:
    # glibc shrinks the heap's top by itself past M_TRIM_THRESHOLD: set it out of reach, so the
    # freed blocks stay resident until the trim, wherever they lie.
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
    out = subprocess.run(
        [sys.executable, "-c", _FRAGMENTED_HEAP],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env=env,
    )
    held, freed, after_trim = map(int, out.stdout.split())
    assert freed > held - 20  # glibc kept the freed blocks' pages
    assert after_trim < held - 150  # malloc_trim returned them
