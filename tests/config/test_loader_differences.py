"""config_differences: the dotted keys that differ between two configurations."""

from __future__ import annotations

from fedloom.config.loader import config_differences


def test_differences_name_nested_added_and_removed_keys() -> None:
    old = "seed = 1\nrounds = 3\n[client]\nlr = 0.1\n[model]\nkwargs = { hidden = 100 }\n"
    new = "seed = 1\nrounds = 4\n[client]\nlr = 0.1\nepochs = 2\n[model]\nkwargs = { hidden = 50 }\n"
    assert config_differences(old, new) == ["client.epochs", "model.kwargs.hidden", "rounds"]
    assert config_differences(new, new) == []
    assert config_differences("not = [toml", new) == ["<unparseable stored config>"]
