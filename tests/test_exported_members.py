"""The public surface: every name in a public package's ``__all__`` exists and is documented."""

from __future__ import annotations

import importlib
import inspect

import pytest

PUBLIC = [
    "fedloom",
    "fedloom.tasks",
    "fedloom.metrics",
    "fedloom.core",
    "fedloom.algorithms",
    "fedloom.transforms",
    "fedloom.models",
    "fedloom.config",
    "fedloom.data",
    "fedloom.privacy",
    "fedloom.aggregators",
    "fedloom.attacks",
    "fedloom.secagg",
    "fedloom.dashboard",
    "fedloom.trackers",
]


@pytest.mark.parametrize("name", PUBLIC)
def test_all_names_resolve_and_are_documented(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    assert len(exported) == len(set(exported)), f"{name}.__all__ has duplicates"
    for member in exported:
        obj = getattr(module, member)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            assert obj.__doc__, f"{name}.{member} has no docstring"


def test_top_level_all_is_exactly_the_public_names() -> None:
    import fedloom

    public = {n for n in dir(fedloom) if not n.startswith("_") and not inspect.ismodule(getattr(fedloom, n))}
    assert public == set(fedloom.__all__) - {"__version__"}
