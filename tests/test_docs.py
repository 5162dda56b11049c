"""The README's configuration reference is generated from the schema and must stay in sync."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_config_reference_matches_schema() -> None:
    spec = importlib.util.spec_from_file_location("update_docs", REPO / "scripts" / "update_docs.py")
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert mod.render(text) == text, "README config reference is stale: run `python scripts/update_docs.py`"


def test_quick_start_test_command_is_what_ci_runs() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    command = "bash scripts/setup.sh --dev && bash scripts/check.sh"
    assert command in readme
    assert command in ci
