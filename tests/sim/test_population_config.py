"""``data.dataset = "population"``: a million lazily generated clients from the experiment file."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch
from tests.conftest import cli_env, run_cli

from fedloom.algorithms.api import ClientUpdate, ServerContext
from fedloom.config import load_config
from fedloom.core.rng import numpy_rng
from fedloom.data.population import LazyPopulation
from fedloom.data.stats import partition_stats
from fedloom.sim.build import build_components
from fedloom.sim.executor import SequentialExecutor
from fedloom.sim.runner import run_simulation
from fedloom.sim.sampling import draw_cohort

MILLION = 1_000_000
POP = (
    "data.dataset=population",
    f"data.num_clients={MILLION}",
    "data.population_dim=7",
    "data.population_classes=3",
    "data.population_min_size=5",
    "data.population_max_size=9",
    "data.population_test_clients=4",
    "sampling.fraction=0.000001",
    "sampling.min_clients=3",
    "executor=sequential",
    "eval.target_accuracy=0",
    "seed=3",
)


def _direct() -> LazyPopulation:
    return LazyPopulation(MILLION, seed=3, dim=7, num_classes=3, min_size=5, max_size=9)


def test_the_cohorts_data_is_lazy_populations_direct_generation() -> None:
    cfg = load_config(None, POP)
    comps = build_components(cfg)
    direct = _direct()
    assert comps.train.num_clients == MILLION
    cohort = draw_cohort(3, 1, MILLION, scheme="fixed", fraction=cfg.sampling.fraction, min_clients=3)
    assert len(cohort) == 3
    for cid in [*cohort.tolist(), 0, MILLION - 1]:
        got, want = comps.train.client_data(cid), direct.client_data(cid)
        assert torch.equal(got.x, want.x)
        assert torch.equal(got.y, want.y)
        assert comps.train.client_size(cid) == len(want)
        assert 5 <= len(want) <= 9
    assert comps.test is not None
    held = direct.held_out(4)
    assert torch.equal(comps.test.x, held.x)
    assert torch.equal(comps.test.y, held.y)
    # The held-out clients are not population clients: their streams differ from clients 0..3.
    assert not torch.equal(held.x[: len(direct.client_data(0))], direct.client_data(0).x)
    assert tuple(comps.workspace.module(torch.zeros(2, 7)).shape) == (2, 3)  # logistic regression, 7 -> 3


def test_a_round_from_the_config_equals_a_round_on_the_population_itself(tmp_path: Path) -> None:
    cfg = load_config(None, (*POP, "rounds=1", "client.steps=3", "client.batch_size=2"))
    comps = build_components(cfg)
    result = run_simulation(cfg, tmp_path / "run", components=comps)
    # The same round by hand: the algorithm on LazyPopulation's own data for the drawn cohort.
    algo = comps.algorithm
    state = algo.server_init(comps.initial_params)
    ctx = ServerContext(3, 1, MILLION)
    cohort = draw_cohort(
        3, 1, MILLION, scheme="fixed", fraction=cfg.sampling.fraction, min_clients=3
    ).tolist()
    ex = SequentialExecutor(comps.workspace, _direct(), comps.pipeline)
    outs = ex.run_round(algo, algo.broadcast(state), cohort, {}, ctx)
    updates = [o for o in outs if isinstance(o, ClientUpdate)]
    assert len(updates) == 3
    want = algo.server_update(state, algo.aggregate(updates, ctx), ctx).params
    for name, value in want.items():
        assert np.array_equal(np.asarray(result.state.params[name]), np.asarray(value)), name


_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    sys.argv = ["fedloom", "simulate", *sys.argv[1:]]
    from fedloom.cli.main import main

    try:
        main()
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    status = Path("/proc/self/status").read_text().splitlines()
    print("VmHWM_KB", next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")))
    """
)


def _peak_rss_kb(tmp_path: Path, population: int) -> int:
    sets = (
        "data.dataset=population", f"data.num_clients={population}", "data.population_test_clients=5",
        "sampling.fraction=0.000001", "sampling.min_clients=100", "rounds=2", "executor=sequential",
        "eval.target_accuracy=0", f"out_dir={str(tmp_path / str(population))!r}",
    )  # fmt: skip
    args = [a for s in sets for a in ("--set", s)]
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, *args], cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
        timeout=280,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "round 2" in proc.stdout
    assert "clients 100" in proc.stdout
    return int(proc.stdout.split("VmHWM_KB")[1].split()[0])


def test_a_million_client_run_peaks_like_a_thousand_client_run(tmp_path: Path) -> None:
    """Two rounds of 100 clients: the peak RSS (VmHWM) does not grow with the population.

    A per-client Python object or array over 10^6 clients (e.g. a list of sizes,
    ~36 MB; the size array, 8 MB) would show as the difference; the bound allows
    allocator noise only.
    """
    small = _peak_rss_kb(tmp_path, 1_000)
    big = _peak_rss_kb(tmp_path, MILLION)
    assert big < 1_000_000, f"peak RSS {big} KB for 10^6 clients"  # torch itself is ~300 MB
    assert big - small < 6_000, f"10^6 clients peaked at {big} KB, 10^3 clients at {small} KB"


def test_partition_summarises_a_seeded_sample_of_a_million_clients(tmp_path: Path) -> None:
    proc = run_cli("partition", *[a for s in POP for a in ("--set", s)], "--sample", "200", cwd=tmp_path)
    assert "statistics of a seeded sample of 200 of the 1000000 clients" in proc.stdout
    ids = np.sort(numpy_rng(3, "partition-sample").choice(MILLION, size=200, replace=False))
    stats = partition_stats(_direct(), 3, clients=ids)
    assert f"200 clients, {stats.total} examples, 3 classes" in proc.stdout
    first = stats.clients[0]
    assert first.cid == int(ids[0])
    assert f"│ {first.cid:>6} │" in proc.stdout or f" {first.cid} " in proc.stdout
