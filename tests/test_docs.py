"""The documentation stays true: the generated configuration reference, the README's commands and
links, the algorithm example, and the docs site built with ``mkdocs build --strict``."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_config_reference_matches_schema() -> None:
    spec = importlib.util.spec_from_file_location("update_docs", REPO / "scripts" / "update_docs.py")
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert "<!-- config-reference:start -->" in text
    assert mod.render(text) == text, "config reference is stale: run `python scripts/update_docs.py`"


def test_quick_start_test_command_is_what_ci_runs() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    command = "bash scripts/setup.sh --dev && bash scripts/check.sh"
    assert command in readme
    assert command in ci


def test_readme_is_short_and_opens_with_the_quick_start() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 400
    first_block = re.search(r"```bash\n(.*?)```", readme, flags=re.S)
    assert first_block is not None
    lines = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    assert lines == [
        "bash scripts/setup.sh && .venv/bin/fedloom simulate",
        "bash scripts/setup.sh --dev && bash scripts/check.sh",
    ]


def test_readme_relative_links_resolve() -> None:
    """The README is outside the docs site, so mkdocs does not check its links: this does."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)\)", readme)
    assert targets
    for target in targets:
        if target.startswith(("http://", "https://", "#")):
            continue
        assert (REPO / target.split("#")[0]).exists(), target


def test_docs_site_builds_strictly(tmp_path: Path) -> None:
    """``mkdocs build --strict``: a broken link or anchor, a page missing from the nav, an unresolved
    API cross-reference or a docstring that does not match its signature is an error."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    assert 'id="fedloom.Task"' in api  # the reference really rendered the docstrings


def test_add_an_algorithm_example_runs_a_round() -> None:
    """The 'How to add an algorithm' code block is real code: it must run and match FedProx."""
    import torch

    from fedloom.algorithms import ClientContext, LocalSGD, ServerContext, Workspace
    from fedloom.algorithms.fedprox import FedProx
    from fedloom.core.params import Params
    from fedloom.data.datasets import ArrayDataset

    page = (REPO / "docs" / "algorithms.md").read_text(encoding="utf-8")
    section = page.split("## How to add an algorithm", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert code is not None
    namespace: dict[str, object] = {}
    exec(compile(code.group(1), "docs/algorithms.md", "exec"), namespace)
    algo_cls = namespace["FedProxLike"]

    gen = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.randn(12, 4, generator=gen), torch.randint(0, 3, (12,), generator=gen), 3)
    start = Params.from_module(torch.nn.Linear(4, 3))
    local = LocalSGD(lr=0.1, epochs=2, batch_size=4)
    results = []
    for algo in (algo_cls(local=local, mu=0.5), FedProx(local=local, mu=0.5)):  # type: ignore[operator]
        ws = Workspace(torch.nn.Linear(4, 3))
        state = algo.server_init(start)
        upd = algo.client_update(ws, algo.broadcast(state), None, data, ClientContext(0, 1, 0))
        ctx = ServerContext(seed=0, round=1, population=1)
        results.append(algo.server_update(state, algo.aggregate([upd], ctx), ctx).params)
    assert results[0].allclose(results[1], rtol=1e-6, atol=1e-7)
