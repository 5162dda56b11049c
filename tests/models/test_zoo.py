from __future__ import annotations

import pytest
import torch

from fedloom.core.errors import ConfigError
from fedloom.core.params import Params
from fedloom.models import CNN, MLP2NN, build_model


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_mcmahan_models_have_the_papers_sizes_and_shapes() -> None:
    # 2NN: 784*200+200 + 200*200+200 + 200*10+10; CNN: conv 5x5x1x32+32, 5x5x32x64+64, 3136*512+512, 512*10+10.
    assert _count(MLP2NN()) == 199_210
    assert _count(CNN()) == 1_663_370
    x = torch.zeros(3, 1, 28, 28)
    assert MLP2NN()(x).shape == (3, 10)
    assert CNN()(x).shape == (3, 10)


def test_build_model_is_seeded_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    a = Params.from_module(build_model("2nn", {}, seed=1))
    assert torch.equal(torch.rand(2), expected)
    assert a.equal(Params.from_module(build_model("2nn", {}, seed=1)))
    assert not a.equal(Params.from_module(build_model("2nn", {}, seed=2)))


def test_any_module_by_import_path() -> None:
    m = build_model("torch.nn:Linear", {"in_features": 4, "out_features": 2}, seed=0)
    assert isinstance(m, torch.nn.Linear)
    assert m.weight.shape == (2, 4)


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("resnet", {}, "unknown model"),
        ("no_such_pkg.mod:Net", {}, "cannot import module"),
        ("torch.nn:NoSuchLayer", {}, "has no callable"),
        ("torch.nn:Linear", {"bogus": 1}, "rejected by"),
        ("math:sqrt", {}, "rejected by"),
    ],
)
def test_bad_model_names_are_config_errors(name: str, kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_model(name, kwargs, seed=0)
