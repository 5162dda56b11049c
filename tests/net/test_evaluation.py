"""Evaluation rounds in deployment: each site evaluates the global model on its own test split.

Real server and client processes on loopback, the heart-disease task shipped with fedloom
(FLamby's per-hospital train/test splits); each site's reported metrics are checked
against a hand-written evaluation of the saved global model on that site's test split.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import safetensors.torch
import torch
from tests.net.helpers import HOSPITALS, Proc, free_port

from fedloom.data.heart_flamby import all_hospitals
from fedloom.engine.events import Evaluated
from fedloom.net.evaluation import (
    EvaluationReportError,
    check_report,
    site_metrics,
)
from fedloom.net.proto import fedloom_pb2 as pb
from fedloom.net.proto import fedloom_pb2_grpc as pbg
from fedloom.net.wire import encode_chunk
from fedloom.sim.evaluate import EvalResult

pytestmark = pytest.mark.slow

HEART_TOML = """
seed = 5
rounds = {rounds}
[data]
dataset = "heart_disease"
num_clients = 4
[client]
lr = 0.05
epochs = 2
batch_size = 16
[algorithm]
name = "fedavg"
[sampling]
fraction = 1.0
min_clients = 4
[eval]
every = {every}
target_accuracy = 0.0
[deploy]
clients = ["cleveland", "hungarian", "switzerland", "va"]
deadline_s = {deadline}
min_quorum = {quorum}
heartbeat_s = 0.5
offline_after_s = 5.0
"""


def _server(cwd: Path, cfg: Path, port: int) -> Proc:
    # No --eval-data: the server holds no test data; only the sites evaluate.
    args = ["server", "--config", str(cfg), "--listen", f"127.0.0.1:{port}", "--state-dir", str(cwd / "srv")]
    return Proc(args, cwd, "server")


def _site(cwd: Path, cfg: Path, name: str, port: int) -> Proc:
    """`fedloom client` with the site's own experiment file and its task's data (train and test)."""
    args = [
        "client",
        "--server",
        f"127.0.0.1:{port}",
        "--config",
        str(cfg),
        "--client-id",
        name,
        "--data",
        "task",
        "--state-dir",
        str(cwd / "cstate" / name),
        "--give-up-after",
        "60",
    ]
    return Proc(args, cwd, name)


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def _hand_evaluation(weights: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Logistic regression by hand, in float64: mean cross-entropy, accuracy, and AUC by counting pairs."""
    w = weights["linear.weight"].to(torch.float64)
    b = weights["linear.bias"].to(torch.float64)
    logits = x.to(torch.float64) @ w.T + b
    logp = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    labels = y.to(torch.int64)
    loss = float(-logp[torch.arange(len(labels)), labels].mean())
    accuracy = float((logits.argmax(dim=1) == labels).to(torch.float64).mean())
    score = (logits[:, 1] - logits[:, 0]).tolist()
    pos = [s for s, t in zip(score, labels.tolist(), strict=True) if t == 1]
    neg = [s for s, t in zip(score, labels.tolist(), strict=True) if t == 0]
    if pos and neg:
        wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
        auc = wins / (len(pos) * len(neg))
    else:
        auc = float("nan")
    return {"loss": loss, "accuracy": accuracy, "auc": auc, "num_examples": float(len(labels))}


def test_each_site_reports_its_own_evaluation_of_the_global_model(tmp_path: Path) -> None:
    cfg = tmp_path / "site.toml"
    cfg.write_text(HEART_TOML.format(rounds=3, every=2, quorum=4, deadline=30.0), encoding="utf-8")
    port = free_port()
    srv = _server(tmp_path, cfg, port)
    sites = [_site(tmp_path, cfg, h, port) for h in HOSPITALS]
    try:
        assert srv.wait(240) == 0, srv.err.read_text()[-3000:]
        for s in sites:
            assert s.wait(30) == 0, s.err.read_text()[-2000:]
    finally:
        for p in [srv, *sites]:
            p.stop()

    rows = _rows(tmp_path / "srv" / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2, 3]
    # eval.every = 2: round 2, and the last round
    assert "sites" not in rows[0]
    assert "site_accuracy" not in rows[0]
    assert set(rows[1]["sites"]) == set(rows[2]["sites"]) == set(HOSPITALS)
    assert "test_accuracy" not in rows[2]  # no central test set on this server

    # The saved global model, evaluated by hand on each site's own test split.
    weights = safetensors.torch.load((tmp_path / "srv" / "model.safetensors").read_bytes())
    splits = all_hospitals()
    last = rows[2]
    expected = {h: _hand_evaluation(weights, splits[h][1].x, splits[h][1].y) for h in HOSPITALS}
    for h in HOSPITALS:
        got, want = last["sites"][h], expected[h]
        assert got["num_examples"] == want["num_examples"] == len(splits[h][1]), h
        assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-12), h
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), h
        if math.isnan(want["auc"]):
            assert got["auc"] is None or math.isnan(got["auc"]), h
        else:
            assert got["auc"] == pytest.approx(want["auc"], abs=1e-9), h
    # The aggregate: the example-weighted mean and the distribution across sites.
    n = np.array([expected[h]["num_examples"] for h in HOSPITALS])
    acc = np.array([expected[h]["accuracy"] for h in HOSPITALS])
    assert last["site_accuracy"] == pytest.approx(float((n * acc).sum() / n.sum()), abs=1e-12)
    assert last["site_accuracy_min"] == pytest.approx(acc.min(), abs=1e-12)
    assert last["site_accuracy_median"] == pytest.approx(float(np.median(acc)), abs=1e-12)
    assert last["site_accuracy_max"] == pytest.approx(acc.max(), abs=1e-12)
    assert last["site_accuracy_p10"] == pytest.approx(float(np.percentile(acc, 10)), abs=1e-12)

    # The state database holds the same rows, and an audit row per site evaluation.
    con = sqlite3.connect(f"file:{tmp_path / 'srv' / 'state.sqlite'}?mode=ro", uri=True)
    try:
        stored = [
            json.loads(m) for (m,) in con.execute("SELECT json FROM metrics WHERE round > 0 ORDER BY round")
        ]
        audit = con.execute(
            "SELECT round, client FROM audit WHERE event = 'evaluated' ORDER BY round, client"
        ).fetchall()
    finally:
        con.close()
    assert [s.get("sites") for s in stored] == [r.get("sites") for r in rows]
    assert sorted(audit) == sorted((r, h) for r in (2, 3) for h in HOSPITALS)
    # Each site logged what it reported.
    for s in sites:
        assert [e["round"] for e in s.events("evaluated")] == [2, 3], s.name


class _CraftedSite:
    """A hand-driven client of the raw protocol: reports a training failure, and crafted evaluations."""

    def __init__(self, port: int, name: str) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pbg.CoordinatorStub(self.channel)  # type: ignore[no-untyped-call]
        self.md = (("fedloom-client", name), ("fedloom-token", ""))
        self.push = self.channel.unary_unary(
            "/fedloom.net.v1.Coordinator/Push",
            request_serializer=lambda b: b,
            response_deserializer=pb.UploadReply.FromString,
            _registered_method=True,
        )

    def run(
        self, reports: dict[int, list[pb.EvalReport]], silent: int, deadline_s: float = 200
    ) -> dict[int, list[Any]]:
        """Serve until DONE: report a training failure, except in round ``silent`` (no answer: a dropout);
        at round r's evaluation send ``reports[r]`` (with the task's digest)."""
        replies: dict[int, list[Any]] = {}
        end = time.monotonic() + deadline_s
        # wait_for_ready: joins as soon as the server listens (a failed connect would back off for seconds)
        self.stub.Join(
            pb.JoinRequest(client_name=self.md[0][1]), metadata=self.md, timeout=120, wait_for_ready=True
        )
        while time.monotonic() < end:
            task = self.stub.GetTask(pb.TaskRequest(wait_s=2.0), metadata=self.md, timeout=20)
            if task.kind == pb.DONE:
                return replies
            if task.kind == pb.TRAIN and task.round == silent:
                time.sleep(0.2)
            elif task.kind == pb.TRAIN:
                header = pb.UpdateHeader(
                    round=task.round, broadcast_digest=task.broadcast_digest, failure="error: crafted"
                )
                self.push(encode_chunk(b"", header), metadata=self.md, timeout=10)
            elif task.kind == pb.EVALUATE:
                none = pb.EvalReport(unavailable="crafted: no test split")
                for report in reports.get(task.round, [none]):
                    report.round = task.round
                    report.model_digest = task.broadcast_digest
                    reply = self.stub.Evaluate(report, metadata=self.md, timeout=10)
                    replies.setdefault(task.round, []).append(reply)
        raise AssertionError("the crafted site never got DONE")


def test_hostile_evaluation_reports_are_refused_by_name_and_the_run_continues(tmp_path: Path) -> None:
    cfg = tmp_path / "site.toml"
    # Short deadline: the crafted site's silence in round 2 holds that round to it.
    cfg.write_text(HEART_TOML.format(rounds=2, every=1, quorum=3, deadline=12.0), encoding="utf-8")
    port = free_port()
    srv = _server(tmp_path, cfg, port)
    honest = [_site(tmp_path, cfg, h, port) for h in HOSPITALS if h != "va"]
    nan_metric = pb.EvalReport(num_examples=10, loss=0.5, metrics={"accuracy": float("nan"), "auc": 0.5})
    negative = pb.EvalReport(num_examples=-3, loss=0.5, metrics={"accuracy": 0.5, "auc": 0.5})
    again = pb.EvalReport(num_examples=10, loss=0.5, metrics={"accuracy": 0.5, "auc": 0.5})
    try:
        srv.wait_event("listening", timeout=120)
        replies = _CraftedSite(port, "va").run({1: [nan_metric, again], 2: [negative]}, silent=0)
        assert srv.wait(120) == 0, srv.err.read_text()[-3000:]
        for s in honest:
            assert s.wait(30) == 0, s.err.read_text()[-2000:]
    finally:
        for p in [srv, *honest]:
            p.stop()

    first, duplicate = replies[1]
    assert not first.accepted
    assert "'va'" in first.error
    assert "'metrics'" in first.error
    assert "accuracy" in first.error
    assert not duplicate.accepted
    assert "already answered" in duplicate.error
    (neg,) = replies[2]
    assert not neg.accepted
    assert "'va'" in neg.error
    assert "'num_examples' = -3" in neg.error
    # The run went on: both rounds committed, each with the three honest sites only.
    rows = _rows(tmp_path / "srv" / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert set(r["sites"]) == {"cleveland", "hungarian", "switzerland"}
        assert all(math.isfinite(v) for v in (r["site_loss"], r["site_accuracy"]))
    refusals = [e for e in srv.events("evaluation_refused") if e["client"] == "va"]
    assert [e["round"] for e in refusals] == [1, 1, 2]


# ---- the report's checks and the metric keys, without processes -------------------------------


def _report(**kw: Any) -> pb.EvalReport:
    base: dict[str, Any] = {"round": 3, "model_digest": "abc", "num_examples": 7, "loss": 0.25}
    base.update(kw)
    return pb.EvalReport(**base)


@pytest.mark.parametrize(
    ("report", "field"),
    [
        (_report(metrics={"accuracy": float("inf")}), "'metrics'"),
        (_report(metrics={"accuracy": 0.5, "secret_sauce": 1.0}), "'metrics' names 'secret_sauce'"),
        (_report(metrics={}), "lacks the task's metric(s) accuracy"),
        (_report(metrics={"accuracy": 0.5}, num_examples=0), "'num_examples' = 0"),
        (_report(metrics={"accuracy": 0.5}, num_examples=10**12), "'num_examples'"),
        (_report(metrics={"accuracy": 0.5}, loss=float("nan")), "'loss'"),
        (_report(metrics={"accuracy": 0.5}, round=2), "'round' = 2"),
        (_report(metrics={"accuracy": 0.5}, model_digest="zzz"), "'model_digest'"),
        (_report(undefined=["nope"], metrics={"accuracy": 0.5}), "'undefined' names 'nope'"),
        (_report(unavailable="no data", metrics={"accuracy": 0.5}), "'unavailable'"),
    ],
)
def test_check_report_refuses_each_bad_field_by_name(report: pb.EvalReport, field: str) -> None:
    with pytest.raises(EvaluationReportError) as err:
        check_report(report, client="va", round=3, digest="abc", known=["accuracy"])
    assert "'va'" in str(err.value)
    assert field in str(err.value)


def test_check_report_takes_an_undefined_metric_as_nan_and_no_data_as_none() -> None:
    ev = check_report(
        _report(metrics={"accuracy": 0.5}, undefined=["auc"]),
        client="va",
        round=3,
        digest="abc",
        known=["accuracy", "auc"],
    )
    assert ev is not None
    assert ev.num_examples == 7
    assert ev.metrics["accuracy"] == 0.5
    assert math.isnan(ev.metrics["auc"])
    none = check_report(
        pb.EvalReport(round=3, model_digest="abc", unavailable="no test split"),
        client="va",
        round=3,
        digest="abc",
        known=["accuracy"],
    )
    assert none is None


def test_site_metrics_have_the_simulations_keys() -> None:
    from fedloom.engine.evaluation import _across_clients

    results = {
        "a": EvalResult(loss=0.5, num_examples=10, metrics={"accuracy": 0.9, "auc": 0.8}),
        "b": EvalResult(loss=1.0, num_examples=30, metrics={"accuracy": 0.5, "auc": float("nan")}),
    }
    got = site_metrics(results)
    sim = _across_clients("site", list(results.values()), with_distribution=True)
    assert {k: v for k, v in got.items() if k != "sites"} == sim
    assert got["site_accuracy"] == pytest.approx((10 * 0.9 + 30 * 0.5) / 40)
    assert got["site_auc"] == 0.8  # the undefined value is left out of the mean


def test_report_of_the_deployment_agrees_with_its_metrics_and_audit_log(tmp_path: Path) -> None:
    """`fedloom report` on a deployment state directory: a crafted site fails round 1 and drops out of round 2."""
    from tests.results.test_report_runs import check_html, close, table

    from fedloom.results.report import write_report

    cfg = tmp_path / "site.toml"
    cfg.write_text(HEART_TOML.format(rounds=2, every=1, quorum=3, deadline=12.0), encoding="utf-8")
    port = free_port()
    srv = _server(tmp_path, cfg, port)
    honest = [_site(tmp_path, cfg, h, port) for h in HOSPITALS if h != "va"]
    try:
        srv.wait_event("listening", timeout=120)
        _CraftedSite(port, "va").run({}, silent=2)
        assert srv.wait(120) == 0, srv.err.read_text()[-3000:]
        for s in honest:
            assert s.wait(30) == 0, s.err.read_text()[-2000:]
    finally:
        for p in [srv, *honest]:
            p.stop()

    state = tmp_path / "srv"
    out = tmp_path / "report"
    report = write_report([state], out)
    pngs = [p for p in report.paths if p.suffix == ".png"]
    assert [p.name for p in pngs] == [
        "accuracy.png",
        "loss.png",
        "sites.png",
        "site-distribution.png",
        "participation.png",
        "bytes.png",
    ]
    check_html(out, pngs)
    text = (out / "summary.md").read_text(encoding="utf-8")
    assert "deployment run in" in text
    assert "participation read from events" in text
    rows = _rows(state / "metrics.jsonl")
    shown = dict(table(text, "| metric | value |"))
    scalars = {k: v for k, v in rows[-1].items() if not isinstance(v, dict)}
    assert set(shown) == set(scalars)
    for k, v in scalars.items():
        assert close(shown[k], v), k
    # Participation per round against the server's own records: the audit table and metrics.jsonl.
    con = sqlite3.connect(f"file:{state / 'state.sqlite'}?mode=ro", uri=True)
    try:
        audit = con.execute("SELECT round, client, event, bytes, detail FROM audit ORDER BY seq").fetchall()
    finally:
        con.close()
    part = {int(c[0]): c for c in table(text, "| round | selected | accepted |")}
    assert sorted(part) == [1, 2]
    for r, row in zip((1, 2), rows, strict=True):
        cells = part[r]
        # the round's committed attempt: its audit rows after the last aborted attempt's
        mine = [a for a in audit if a[0] == r]
        aborted = [i for i, a in enumerate(mine) if a[2] == "round_aborted"]
        mine = mine[aborted[-1] + 1 :] if aborted else mine
        failed = [(c, d) for _, c, e, _, d in mine if e == "failed"]
        dropped = [c for _, c, e, _, _ in mine if e == "dropout"]
        accepted = [c for _, c, e, _, _ in mine if e == "accepted"]
        assert int(cells[1]) == 4
        assert int(cells[2]) == len(accepted) == row["num_clients"] == 3
        assert (len(failed), len(dropped)) == ((1, 0) if r == 1 else (0, 1))
        assert (row["num_failed"], row["num_dropouts"]) == (len(failed), len(dropped))
        # the round's events: nothing rejected; a client that reported a failure, like one that
        # went silent, sent no update (a client_dropped event whose reason says "failed: ...")
        assert int(cells[3]) == 0
        assert int(cells[4]) == len(failed) + len(dropped) == 1
        assert "va: failed: error: crafted" in cells[5] if r == 1 else "dropped: va:" in cells[5]
    # Bytes up per round: the accepted updates' bytes in the audit log.
    moved = {int(c[0]): c for c in table(text, "| round | down | up |")}
    for r in (1, 2):
        mine = [a for a in audit if a[0] == r]
        aborted = [i for i, a in enumerate(mine) if a[2] == "round_aborted"]
        mine = mine[aborted[-1] + 1 :] if aborted else mine
        assert int(moved[r][2]) == sum(b for _, _, e, b, _ in mine if e == "accepted")


def test_the_server_hands_each_site_evaluation_to_its_observers(tmp_path: Path) -> None:
    """run_server in this process (observers are Python callables), four real client processes."""
    import io
    import threading

    from fedloom.config.loader import load_config
    from fedloom.engine.events import Event
    from fedloom.net.logs import JsonLog
    from fedloom.net.server import ServerOptions, run_server

    cfg_path = tmp_path / "site.toml"
    cfg_path.write_text(HEART_TOML.format(rounds=1, every=1, quorum=4, deadline=30.0), encoding="utf-8")
    port = free_port()
    seen: list[Event] = []
    options = ServerOptions(listen=f"127.0.0.1:{port}", linger_s=5.0)
    buf = io.StringIO()
    log = JsonLog("server", stream=buf)
    done: list[Any] = []
    thread = threading.Thread(
        target=lambda: done.append(
            run_server(load_config(cfg_path), tmp_path / "srv", options, log, observers=[seen.append])
        ),
        daemon=True,
    )
    thread.start()
    sites = [_site(tmp_path, cfg_path, h, port) for h in HOSPITALS]
    try:
        thread.join(timeout=240)
        assert done, buf.getvalue()[-3000:]
        for s in sites:
            assert s.wait(30) == 0, s.err.read_text()[-2000:]
    finally:
        for p in sites:
            p.stop()
    (row,) = _rows(tmp_path / "srv" / "metrics.jsonl")
    evaluated = [e for e in seen if isinstance(e, Evaluated)]
    assert [(e.scope, e.site) for e in evaluated] == [("sites", None)] + [("site", h) for h in HOSPITALS]
    for e in evaluated[1:]:
        assert e.round == 1
        assert e.examples == row["sites"][e.site]["num_examples"]
        assert e.metrics["accuracy"] == row["sites"][e.site]["accuracy"]
    assert evaluated[0].metrics["accuracy"] == row["site_accuracy"]
    assert evaluated[0].metrics["accuracy_median"] == row["site_accuracy_median"]
