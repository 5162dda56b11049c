"""``fedloom simulate --resume`` refuses what would silently corrupt or replace a run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tests.conftest import run_cli

_SETS = [
    "data.dataset=synthetic", "data.num_clients=6", "rounds=2", "sampling.fraction=0.5",
    "eval.target_accuracy=0", "seed=5", "model.name=logreg", "model.kwargs={in_features = 60}",
]  # fmt: skip


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A completed two-round simulation."""
    cwd = tmp_path_factory.mktemp("finished")
    args = [a for s in _SETS for a in ("--set", s)]
    run_cli("simulate", *args, "--out", str(cwd / "run"), "--no-report", cwd=cwd)
    return cwd / "run"


def _files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_resume_refuses_a_config_that_differs_from_the_runs_and_names_the_keys(
    finished: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    cfg = run / "config.toml"
    text = cfg.read_text()
    assert "rounds = 2\n" in text
    cfg.write_text(text.replace("rounds = 2\n", "rounds = 3\n").replace("seed = 5\n", "seed = 6\n"))
    before = _files(run)
    proc = run_cli("simulate", "--resume", str(run), "--no-report", cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    said = " ".join((proc.stdout + proc.stderr).split())
    assert "different configuration" in said
    assert "differs in rounds, seed" in said  # rounds alone may change (see the next test)
    after = _files(run)
    assert {k: v for k, v in after.items() if not k.startswith("state.sqlite")} == {
        k: v for k, v in before.items() if not k.startswith("state.sqlite")
    }


def test_resume_may_extend_the_round_budget(finished: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    cfg = run / "config.toml"
    cfg.write_text(cfg.read_text().replace("rounds = 2\n", "rounds = 3\n"))
    run_cli("simulate", "--resume", str(run), "--no-report", cwd=tmp_path)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("resume", [True, False])
def test_artefacts_without_a_run_in_the_database_are_never_overwritten(
    finished: Path, tmp_path: Path, resume: bool
) -> None:
    """An empty database (lost, replaced, or copied without its -wal file) beside checkpoints and
    metrics: resuming, or starting afresh in the same directory, refuses and leaves them alone."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    for p in run.glob("state.sqlite*"):
        p.unlink()
    if resume:
        (run / "state.sqlite").write_bytes(b"")
        args = ["--resume", str(run)]
    else:
        args = [a for s in _SETS for a in ("--set", s)] + ["--out", str(run)]
    before = _files(run)
    proc = run_cli("simulate", *args, "--no-report", cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    said = " ".join((proc.stdout + proc.stderr).split())
    assert "holds run artefacts" in said
    assert "checkpoints/" in said
    assert "metrics.jsonl" in said
    assert {k: v for k, v in _files(run).items() if not k.startswith("state.sqlite")} == {
        k: v for k, v in before.items() if not k.startswith("state.sqlite")
    }
