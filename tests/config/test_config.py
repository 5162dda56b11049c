from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedloom.config import config_to_toml, default_config_toml, load_config
from fedloom.core.errors import ConfigError


def _problems(tmp_path: Path, text: str, overrides: tuple[str, ...] = ()) -> str:
    f = tmp_path / "exp.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(f, overrides)
    return str(info.value)


def test_defaults_are_the_documented_main_job() -> None:
    cfg = load_config(None)
    assert (cfg.data.dataset, cfg.data.num_clients, cfg.data.partition, cfg.data.alpha) == (
        "mnist",
        100,
        "dirichlet",
        0.5,
    )
    assert (cfg.model.name, cfg.algorithm.name, cfg.sampling.fraction) == ("2nn", "fedavg", 0.1)
    assert cfg.eval.target_accuracy >= 0.95


def test_unknown_key_is_named(tmp_path: Path) -> None:
    msg = _problems(tmp_path, "[client]\nlearning_rate = 0.1\n")
    assert "client.learning_rate" in msg
    assert "unknown key" in msg
    assert "allowed in [client]: lr, epochs, batch_size, steps" in msg


def test_unknown_key_suggests_the_closest_spelling(tmp_path: Path) -> None:
    msg = _problems(tmp_path, "[data]\nalhpa = 0.3\n")
    assert "did you mean 'alpha'?" in msg
    top = _problems(tmp_path, "round = 3\n")
    assert "did you mean 'rounds'?" in top
    assert "allowed at the top level: seed, rounds" in top


def test_wrong_type_names_key_and_value(tmp_path: Path) -> None:
    msg = _problems(tmp_path, 'rounds = "ten"\n')
    assert "rounds = 'ten'" in msg
    assert "integer" in msg


def test_out_of_range_names_key_value_and_bound(tmp_path: Path) -> None:
    msg = _problems(tmp_path, "[client]\nlr = -0.5\n")
    assert "client.lr = -0.5" in msg
    assert "greater than 0" in msg


def test_bad_choice_lists_allowed_values(tmp_path: Path) -> None:
    msg = _problems(tmp_path, '[data]\npartition = "random"\n')
    assert "data.partition = 'random'" in msg
    assert "'dirichlet'" in msg


def test_all_problems_are_collected(tmp_path: Path) -> None:
    msg = _problems(tmp_path, "seed = -1\n[eval]\nevery = 0\n[sampling]\nfraction = 2.0\n")
    for key in ("seed = -1", "eval.every = 0", "sampling.fraction = 2.0"):
        assert key in msg


def test_cross_field_check(tmp_path: Path) -> None:
    msg = _problems(tmp_path, "[data]\nnum_clients = 5\n[sampling]\nmin_clients = 6\n")
    assert "sampling.min_clients = 6 exceeds data.num_clients = 5" in msg


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    assert "not valid TOML" in _problems(tmp_path, "rounds = = 3\n")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_overrides_parse_toml_values_and_bare_strings() -> None:
    cfg = load_config(None, ["client.lr=0.2", "model.name=cnn", "rounds=7", "eval.federated=true"])
    assert (cfg.client.lr, cfg.model.name, cfg.rounds, cfg.eval.federated) == (0.2, "cnn", 7, True)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["rounds"])
    with pytest.raises(ConfigError, match=r"client\.lrr"):
        load_config(None, ["client.lrr=1"])


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["client.lr=0.3", "model.kwargs={hidden = 16}"])
    f = tmp_path / "c.toml"
    f.write_text(config_to_toml(cfg))
    assert load_config(f) == cfg


def test_default_file_documents_every_key(tmp_path: Path) -> None:
    text = default_config_toml()
    f = tmp_path / "d.toml"
    f.write_text(text)
    assert load_config(f) == load_config(None)
    assert text.count("# ") > 30


@pytest.mark.parametrize(
    "overrides",
    [
        ["algorithm.name='scaffold'"],
        ["privacy.mode='central'"],
        ["server.optimizer='adam'", "server.lr=0.01", "server.weighting='uniform'"],
        ["task='mymod:make'", "task_args={n = 3}"],
    ],
)
def test_the_resolved_config_round_trips(overrides: list[str]) -> None:
    """What a run writes as config.toml (every default filled in) is valid and means the same run."""
    from fedloom.config.loader import parse_config

    cfg = load_config(None, overrides)
    assert parse_config(tomllib.loads(config_to_toml(cfg))) == cfg
