"""A million registered clients, and no memory growth over many rounds."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import pytest
import torch

from fedloom.algorithms.api import ClientUpdate, ServerContext, Workspace
from fedloom.algorithms.fedavg import FedAvg
from fedloom.algorithms.local import LocalSGD
from fedloom.core.params import Params
from fedloom.data.population import LazyPopulation
from fedloom.models.zoo import LogisticRegression
from fedloom.sim.executor import SequentialExecutor
from fedloom.sim.parallel import ParallelExecutor
from fedloom.sim.sampling import sample_clients
from fedloom.transforms.pipeline import Pipeline

MILLION = 1_000_000


def _rss_kb(pid: int | str = "self", field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def test_million_clients_register_and_sample_in_bounded_memory() -> None:
    t0 = time.perf_counter()
    pop = LazyPopulation(MILLION, seed=1)
    assert pop.num_clients == MILLION
    tracemalloc.start()
    cohort = sample_clients(1, 1, MILLION, 1000)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert time.perf_counter() - t0 < 2.0
    assert len(set(cohort.tolist())) == 1000
    assert cohort.max() < MILLION
    # Generator.choice(replace=False) on 10^6 uses Floyd's method / a partial shuffle: far below 10^6 * 8 B
    # would be ideal; we accept and document at most one 8 MB permutation.
    assert peak < 16 * 2**20, f"sampling peaked at {peak / 2**20:.1f} MiB"
    last = MILLION - 1
    a, b = pop.client_data(last), pop.client_data(last)
    assert torch.equal(a.x, b.x)
    assert len(a) == pop.client_size(last)


def test_a_million_client_round_peaks_below_bound() -> None:
    pop = LazyPopulation(MILLION, seed=1)
    module = LogisticRegression(in_features=pop.dim, num_classes=pop.num_classes)
    ws = Workspace(module)
    algo = FedAvg(local=LocalSGD(lr=0.1, batch_size=20, steps=2))
    state = algo.server_init(Params.from_module(module))
    ex = SequentialExecutor(ws, pop, Pipeline(()))
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (Linux)
    base = _rss_kb()
    cohort = sample_clients(1, 1, MILLION, 1000).tolist()
    outcomes = ex.run_round(algo, algo.broadcast(state), cohort, {}, ServerContext(1, 1, MILLION))
    algo.aggregate([o for o in outcomes if isinstance(o, ClientUpdate)], ServerContext(1, 1, MILLION))
    peak_mb = (_rss_kb(field="VmHWM") - base) / 1024
    assert len(outcomes) == 1000
    assert peak_mb < 64, f"a 1000-client round over 10^6 clients raised peak RSS by {peak_mb:.0f} MB"


@pytest.mark.timeout(120)
def test_no_memory_growth_over_200_rounds() -> None:
    pop = LazyPopulation(10_000, seed=2, max_size=40)
    module = LogisticRegression(in_features=pop.dim, num_classes=pop.num_classes)
    algo = FedAvg(local=LocalSGD(lr=0.1, batch_size=20, steps=1))
    state = algo.server_init(Params.from_module(module))
    rss: dict[int, int] = {}
    with ParallelExecutor(Workspace(module), pop, Pipeline(()), workers=2) as ex:
        for r in range(1, 201):
            ctx = ServerContext(2, r, pop.num_clients)
            outcomes = ex.run_round(
                algo, algo.broadcast(state), sample_clients(2, r, 10_000, 20).tolist(), {}, ctx
            )
            agg = algo.aggregate([o for o in outcomes if isinstance(o, ClientUpdate)], ctx)
            state = algo.server_update(state, agg, ctx)
            if r in (50, 200):
                rss[r] = _rss_kb() + sum(_rss_kb(p.pid) for p in ex._procs if p.pid is not None)
    growth_mb = (rss[200] - rss[50]) / 1024
    assert growth_mb < 8, f"RSS of the main process and workers grew {growth_mb:.1f} MB from round 50 to 200"
