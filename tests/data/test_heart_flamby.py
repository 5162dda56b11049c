"""FLamby's Fed-Heart-Disease preprocessing and the built-in heart_disease task, on the shipped files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.conftest import run_cli

from fedloom.config import load_config
from fedloom.core.errors import TaskError
from fedloom.data.heart_disease import HOSPITALS, read_table
from fedloom.data.heart_flamby import FEATURES, SPLIT_SIZES, all_hospitals, stratified_split
from fedloom.sim.build import materialise_config


def test_record_counts_and_split_sizes_match_flamby() -> None:
    parts = all_hospitals()
    # FLamby's README: 303 / 261 / 46 / 130 complete records, split 199/104, 172/89, 30/16, 85/45.
    assert {h: (len(tr), len(te)) for h, (tr, te) in parts.items()} == {
        "cleveland": (199, 104),
        "hungarian": (172, 89),
        "switzerland": (30, 16),
        "va": (85, 45),
    }
    assert {h: (len(tr), len(te)) for h, (tr, te) in parts.items()} == SPLIT_SIZES
    assert sum(len(tr) for tr, _ in parts.values()) == 486  # FLamby's pooled training size
    assert len(FEATURES) == 13
    for tr, te in parts.values():
        assert tuple(tr.x.shape[1:]) == (13,)
        assert tr.num_classes == te.num_classes == 2


def test_first_cleveland_record_is_encoded_by_hand() -> None:
    # processed.cleveland.data line 1: 63,1,1,145,233,1,2,150,0,2.3,3,0,6,0
    # -> age 63, sex 1, trestbps 145, chol 233, fbs 1, thalach 150, exang 0, oldpeak 2.3,
    #    cp = 1 (no dummy set), restecg = 2 (restecg=2 set); num 0 -> no disease.
    assert read_table("cleveland")[0].tolist()[:3] == [63.0, 1.0, 1.0]
    expected = torch.tensor([63, 1, 145, 233, 1, 150, 0, 2.3, 0, 0, 0, 0, 1], dtype=torch.float32)
    train, test = all_hospitals()["cleveland"]
    x = torch.cat([train.x, test.x])
    y = torch.cat([train.y, test.y])
    [row] = torch.nonzero((x == expected).all(dim=1)).flatten().tolist()
    assert int(y[row]) == 0


def test_rows_with_missing_kept_columns_are_dropped_and_labels_binarised() -> None:
    table = read_table("switzerland")
    kept = np.delete(table, [10, 11, 12], axis=1)
    complete = table[~np.isnan(kept).any(axis=1)]
    assert len(complete) == 46
    train, test = all_hospitals()["switzerland"]
    assert int(train.y.sum() + test.y.sum()) == int((complete[:, 13] > 0).sum()) == 45


def test_stratified_split_keeps_class_shares() -> None:
    labels = np.array([0] * 70 + [1] * 30)
    train, test = stratified_split(labels, np.random.default_rng(0))
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(100))
    assert (len(train), len(test)) == (66, 34)
    assert int(labels[test].sum()) == 10  # 34 * 0.3 = 10.2 -> 10 positives, 24 negatives
    # Too few of one class to stratify: a plain random split of the same sizes.
    train, test = stratified_split(np.array([1] * 45 + [0]), np.random.default_rng(0))
    assert (len(train), len(test)) == (30, 16)


def test_builtin_task_has_four_named_hospitals_with_test_splits() -> None:
    cfg = load_config(None, ["data.dataset='heart_disease'", "data.num_clients=4"])
    m = materialise_config(cfg)
    assert m.client_names == HOSPITALS
    assert m.train.client_sizes().tolist() == [199, 172, 30, 85]
    assert m.client_test is not None
    assert m.client_test.client_sizes().tolist() == [104, 89, 16, 45]
    assert m.test is not None
    assert len(m.test) == 254
    assert set(m.workspace.metrics) == {"accuracy", "auc"}
    with pytest.raises(TaskError, match=r"set data\.num_clients = 4"):
        materialise_config(load_config(None, ["data.dataset='heart_disease'"]))


def test_simulate_heart_disease_learns(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_cli("simulate", "--set", "data.dataset='heart_disease'", "--set", "data.num_clients=4",
            "--set", "client.lr=0.001", "--set", "client.batch_size=4", "--set", "client.epochs=5",
            "--set", "sampling.fraction=1.0", "--set", "rounds=10", "--set", "eval.target_accuracy=0",
            "--out", str(run), "--no-report", cwd=tmp_path)  # fmt: skip
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["num_examples"] == 486
    # 132 of the 254 pooled test records (52%) have heart disease; a trained model does clearly better.
    assert rows[-1]["test_accuracy"] > 0.7
    assert set(rows[-1]["sites"]) == set(HOSPITALS)
