"""Built-in models and the registry that resolves a model name or import path.

The McMahan et al. 2017 (arXiv 1602.05629) MNIST models:

- ``2nn``: 784-200-200-10 multilayer perceptron with ReLU (199,210 parameters);
- ``cnn``: conv5x5(32) - maxpool2 - conv5x5(64) - maxpool2 - fc512 - fc10 (1,663,370 parameters);
- ``logreg``: multinomial logistic regression.

And LEAF's Shakespeare model (Caldas et al. 2018, arXiv 1812.01097):

- ``stacked_lstm``: embedding 80 x 8 - two-layer LSTM of 256 units - dense 80 on the last
  step (819,920 parameters; PyTorch keeps two LSTM bias vectors per layer where LEAF's
  TensorFlow cell has one, 817,872).

Any ``torch.nn.Module`` can be used instead by import path, ``"package.module:ClassName"``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from fedloom.core.errors import ConfigError
from fedloom.core.rng import derive_seed

__all__ = [
    "CNN",
    "MLP2NN",
    "LogisticRegression",
    "StackedLSTM",
    "build_model",
    "instantiate_model",
    "register_model",
]


class MLP2NN(nn.Module):
    """McMahan's 2NN: two hidden layers of 200 ReLU units."""

    def __init__(self, in_features: int = 784, hidden: int = 200, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, in_features)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        out: torch.Tensor = self.fc3(x)  # (B, num_classes) logits
        return out


class CNN(nn.Module):
    """McMahan's MNIST CNN: two 5x5 conv layers (32, 64 channels), each max-pooled, fc 512, fc 10."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=2)
        self.fc1 = nn.Linear(64 * 7 * 7, 512)
        self.fc2 = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)  # (B, 32, 14, 14)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)  # (B, 64, 7, 7)
        x = torch.relu(self.fc1(x.flatten(1)))  # (B, 512)
        out: torch.Tensor = self.fc2(x)  # (B, num_classes)
        return out


class LogisticRegression(nn.Module):
    """Multinomial logistic regression on flattened inputs."""

    def __init__(self, in_features: int = 784, num_classes: int = 10) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(x.flatten(1))
        return out


class StackedLSTM(nn.Module):
    """LEAF's next-character model: embedding, a stack of LSTMs, a dense layer on the last step.

    Input: ``(B, T)`` character indices of any integer dtype (fedloom's Shakespeare
    stores uint8); output: ``(B, vocab_size)`` logits for the character after the
    window. LEAF's sizes are the defaults: vocabulary 80, embedding 8, two layers of 256.
    """

    def __init__(
        self, vocab_size: int = 80, embedding_dim: int = 8, hidden: int = 256, num_layers: int = 2
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.lstm = nn.LSTM(embedding_dim, hidden, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emb = self.embedding(x.long())  # (B, T, E)
        out, _ = self.lstm(emb)  # (B, T, H)
        logits: torch.Tensor = self.head(out[:, -1, :])  # (B, vocab)
        return logits


ModelFactory = Callable[..., nn.Module]

_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str, factory: ModelFactory) -> None:
    """Register ``factory`` under ``name``; refuses to overwrite an existing name."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = factory


register_model("2nn", MLP2NN)
register_model("cnn", CNN)
register_model("logreg", LogisticRegression)
register_model("stacked_lstm", StackedLSTM)


def _resolve(name: str) -> ModelFactory:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" not in name:
        known = ", ".join(sorted(_REGISTRY))
        raise ConfigError(
            [f"model.name = {name!r}: unknown model; use one of {known} or 'package.module:Class'"]
        )
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError([f"model.name = {name!r}: cannot import module {module_name!r} ({exc})"]) from exc
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ConfigError([f"model.name = {name!r}: module {module_name!r} has no callable {attr!r}"])
    return factory  # type: ignore[no-any-return]


def instantiate_model(name: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """Build model ``name`` (a registered name or ``package.module:Class``) with ``kwargs``, unseeded."""
    factory = _resolve(name)
    try:
        module = factory(**dict(kwargs))
    except TypeError as exc:
        raise ConfigError([f"model.kwargs = {dict(kwargs)!r}: rejected by {name!r} ({exc})"]) from exc
    if not isinstance(module, nn.Module):
        raise ConfigError(
            [f"model.name = {name!r}: factory returned {type(module).__name__}, not torch.nn.Module"]
        )
    return module


def build_model(name: str, kwargs: Mapping[str, Any], *, seed: int) -> nn.Module:
    """Build a model with initial weights determined only by ``seed``.

    The global torch RNG is forked and restored, so building a model neither
    depends on nor disturbs any other random state.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "model-init"))
        return instantiate_model(name, kwargs)
