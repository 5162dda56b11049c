"""Experiment configuration: a validated TOML schema with documented defaults."""

from fedloom.config.loader import (
    apply_overrides,
    config_reference_markdown,
    config_to_toml,
    default_config_toml,
    load_config,
    parse_config,
)
from fedloom.config.schema import ExperimentConfig

__all__ = [
    "ExperimentConfig",
    "apply_overrides",
    "config_reference_markdown",
    "config_to_toml",
    "default_config_toml",
    "load_config",
    "parse_config",
]
