"""Loading, overriding, validating and writing experiment files (TOML).

Every problem is collected and raised as one :class:`ConfigError` whose lines
name the dotted key, the offending value and what is allowed.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import tomli_w
from pydantic import BaseModel, ValidationError

from fedloom.config.schema import ExperimentConfig
from fedloom.core.errors import ConfigError

__all__ = [
    "apply_overrides",
    "config_differences",
    "config_reference_markdown",
    "config_to_toml",
    "default_config_toml",
    "load_config",
    "parse_config",
]


def _describe(err: Mapping[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "<root>"
    value = err.get("input")
    kind = err["type"]
    msg = str(err["msg"])
    if kind == "extra_forbidden":
        return f"{key}: unknown key (value {value!r}); {_allowed_keys(err['loc'])}"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    return f"{key} = {value!r}: {msg}"


def _allowed_keys(loc: Sequence[int | str]) -> str:
    """The keys allowed where an unknown one was found, closest spelling first."""
    model: type[BaseModel] = ExperimentConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        sub = field.annotation if field is not None else None
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            return "see `fedloom config` for every key"
        model = sub
    names = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), names, n=1)
    prefix = ".".join(str(p) for p in loc[:-1])
    where = f"in [{prefix}]" if prefix else "at the top level"
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{hint}allowed {where}: {', '.join(names)}"


def parse_config(raw: Mapping[str, Any]) -> ExperimentConfig:
    """Validate a nested mapping (as parsed from TOML) into an :class:`ExperimentConfig`."""
    try:
        return ExperimentConfig.model_validate(dict(raw))
    except ValidationError as exc:
        raise ConfigError([_describe(e) for e in exc.errors()]) from None


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word is a string: --set model.name=cnn


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with ``KEY=VALUE`` overrides applied (VALUE parsed as TOML)."""
    out: dict[str, Any] = _deep_copy(raw)
    problems: list[str] = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"--set {item!r}: expected KEY=VALUE, e.g. --set client.lr=0.1")
            continue
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                problems.append(f"--set {key}: {part!r} is not a section")
                break
            node = child
        else:
            node[parts[-1]] = _parse_value(text.strip())
    if problems:
        raise ConfigError(problems)
    return out


def _deep_copy(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in raw.items()}


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """Load ``path`` (or the embedded defaults when ``None``), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError([f"config file {str(p)!r} does not exist"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"config file {str(p)!r} is not valid TOML: {exc}"]) from None
    return parse_config(apply_overrides(raw, overrides))


def config_to_toml(cfg: ExperimentConfig) -> str:
    """The fully resolved configuration (every default filled in) as TOML."""
    return tomli_w.dumps(cfg.model_dump(mode="python"))


def config_differences(stored_toml: str, new_toml: str) -> list[str]:
    """The dotted keys whose values differ between two configurations (TOML texts), sorted.

    A key present in only one of them counts as different; a stored text that does not parse
    is reported as ``["<unparseable stored config>"]``.
    """
    try:
        old = _flatten(tomllib.loads(stored_toml))
    except tomllib.TOMLDecodeError:
        return ["<unparseable stored config>"]
    new = _flatten(tomllib.loads(new_toml))
    return sorted(k for k in old.keys() | new.keys() if old.get(k, _MISSING) != new.get(k, _MISSING))


_MISSING = object()


def _flatten(raw: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def default_config_toml() -> str:
    """The default configuration as TOML, each key preceded by its documentation."""
    lines = ["# fedloom experiment file: every key with its default.", ""]
    defaults = ExperimentConfig()
    sections: list[tuple[str, BaseModel]] = []
    for name, info in ExperimentConfig.model_fields.items():
        value = getattr(defaults, name)
        if isinstance(value, BaseModel):
            sections.append((name, value))
        else:
            lines.append(f"# {info.description}")
            lines.append(tomli_w.dumps({name: value}).strip())
    for name, section in sections:
        lines.append("")
        lines.append(f"[{name}]")
        for key, info in type(section).model_fields.items():
            lines.append(f"# {info.description}")
            value = getattr(section, key)
            lines.append(tomli_w.dumps({key: value}).strip() if value != {} else f"{key} = {{}}")
    return "\n".join(lines) + "\n"


def _schema_rows() -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) for every key of the schema."""
    rows: list[tuple[str, str, str, str]] = []
    defaults = ExperimentConfig()

    def type_name(annotation: Any) -> str:
        if get_origin(annotation) is Literal:
            return "one of " + ", ".join(f"`{a}`" for a in get_args(annotation))
        text = getattr(annotation, "__name__", None) or str(annotation)
        return text.replace("typing.", "")

    for name, info in ExperimentConfig.model_fields.items():
        value = getattr(defaults, name)
        if isinstance(value, BaseModel):
            for key, sub in type(value).model_fields.items():
                default = (
                    tomli_w.dumps({"v": getattr(value, key)}).strip()[4:]
                    if getattr(value, key) != {}
                    else "{}"
                )
                rows.append((f"{name}.{key}", type_name(sub.annotation), default, sub.description or ""))
        else:
            default = tomli_w.dumps({"v": value}).strip()[4:]
            rows.append((name, type_name(info.annotation), default, info.description or ""))
    return rows


def config_reference_markdown() -> str:
    """The configuration reference as a markdown table (embedded in docs/configuration.md)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, typ, default, desc in _schema_rows():
        lines.append(
            f"| `{key}` | {typ.replace('|', chr(92) + '|')} | `{default}` | {desc.replace('|', chr(92) + '|')} |"
        )
    return "\n".join(lines) + "\n"
