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


def test_readme_add_an_algorithm_example_runs_a_round() -> None:
    """The 'How to add an algorithm' code block is real code: it must run and match FedProx."""
    import re

    import torch

    from fedloom.algorithms import ClientContext, LocalSGD, ServerContext, Workspace
    from fedloom.algorithms.fedprox import FedProx
    from fedloom.core.params import Params
    from fedloom.data.datasets import ArrayDataset

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## How to add an algorithm", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert code is not None
    namespace: dict[str, object] = {}
    exec(compile(code.group(1), "README.md", "exec"), namespace)
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
