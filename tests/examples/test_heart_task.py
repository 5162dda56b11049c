"""The heart-disease task (one logit, BCE, accuracy and AUC) simulated and deployed, checked independently."""

from __future__ import annotations

import importlib.util
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.conftest import REPO, run_cli

from fedloom.core.params import Params
from fedloom.core.serde import params_from_bytes

HEART = REPO / "examples" / "heart_disease"
CONFIG = HEART / "heart_task.toml"


def _task_module() -> object:
    sys.path.insert(0, str(HEART))
    try:
        spec = importlib.util.spec_from_file_location("heart_task_under_test", HEART / "heart_task.py")
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(HEART))


def _pairwise_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def _independent(params: Params, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    w = params["weight"].double().numpy().reshape(-1)
    b = float(params["bias"].double().numpy()[0])
    logits = x.double().numpy() @ w + b
    labels = y.numpy().astype(np.int64)
    return float(np.mean((logits > 0) == labels)), _pairwise_auc(logits, labels)


def _metrics(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def heart_data() -> object:
    return _task_module().make().data()  # type: ignore[attr-defined]


def test_simulated_heart_task_reports_per_site_accuracy_and_auc(tmp_path: Path, heart_data: object) -> None:
    run = tmp_path / "run"
    run_cli(
        "simulate",
        "--config",
        str(CONFIG),
        "--set",
        "rounds=10",
        "--out",
        str(run),
        "--no-report",
        cwd=tmp_path,
    )
    last = _metrics(run / "metrics.jsonl")[-1]
    params = params_from_bytes((run / "model.safetensors").read_bytes())
    acc, auc = _independent(params, heart_data.test.x, heart_data.test.y)  # type: ignore[attr-defined]
    assert last["test_accuracy"] == pytest.approx(acc, abs=1e-12)
    assert last["test_auc"] == pytest.approx(auc, abs=1e-12)
    assert acc > 0.6  # it learned something real
    assert auc > 0.7
    sites = last["sites"]
    assert isinstance(sites, dict)
    assert sorted(sites) == ["cleveland", "hungarian", "switzerland", "va"]
    site_auc = []
    for name, test in zip(heart_data.names, heart_data.client_test, strict=True):  # type: ignore[attr-defined]
        a, u = _independent(params, test.x, test.y)
        assert sites[name]["accuracy"] == pytest.approx(a, abs=1e-12)
        assert sites[name]["auc"] == pytest.approx(u, abs=1e-12)
        site_auc.append(u)
    assert last["site_auc_min"] == pytest.approx(min(site_auc), abs=1e-12)
    assert last["site_auc_max"] == pytest.approx(max(site_auc), abs=1e-12)


def test_deployed_heart_task_runs_each_sites_task_and_equals_the_simulation(
    tmp_path: Path, heart_data: object
) -> None:
    pytest.importorskip("grpc")
    from tests.net.helpers import HOSPITALS, Proc, free_port

    rounds = "rounds=4"
    sim = tmp_path / "sim"
    run_cli(
        "simulate", "--config", str(CONFIG), "--set", rounds, "--out", str(sim), "--no-report", cwd=tmp_path
    )
    port = free_port()
    srv = Proc(
        ["server", "--config", str(CONFIG), "--set", rounds, "--listen", f"127.0.0.1:{port}",
         "--state-dir", str(tmp_path / "srv"), "--eval-data", "task"],
        tmp_path, "server",
    )  # fmt: skip
    clients = []
    for h in HOSPITALS:
        args = ["client", "--server", f"127.0.0.1:{port}", "--config", str(CONFIG), "--client-id", h,
                "--state-dir", str(tmp_path / "cstate" / h), "--give-up-after", "60"]  # fmt: skip
        clients.append(Proc(args, tmp_path, h))
    try:
        assert srv.wait(240) == 0, srv.err.read_text()[-3000:]
        for c in clients:
            assert c.wait(30) == 0, c.err.read_text()[-2000:]
            assert c.events("data_loaded")[0]["task"] == "heart-disease"
    finally:
        for p in [srv, *clients]:
            p.stop()
    deployed = params_from_bytes((tmp_path / "srv" / "model.safetensors").read_bytes())
    simulated = params_from_bytes((sim / "model.safetensors").read_bytes())
    assert deployed.equal(simulated)
    last = _metrics(tmp_path / "srv" / "metrics.jsonl")[-1]
    acc, auc = _independent(deployed, heart_data.test.x, heart_data.test.y)  # type: ignore[attr-defined]
    assert last["test_accuracy"] == pytest.approx(acc, abs=1e-12)
    assert last["test_auc"] == pytest.approx(auc, abs=1e-12)
