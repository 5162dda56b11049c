"""What a client accepts from the server's configuration: it selects, it never names code.

A client receives the experiment at ``Join`` and builds its model (and any other
user code) from it. Config keys that can name code to import are listed in
:data:`CODE_KEYS`. For each, the server's value is accepted when it is

- a name in the client's own registry (no ``':'`` and no ``.py``: e.g. ``model.name = "cnn"``),
  which resolves only to code already in the client's process; or
- exactly the value of the same key in the client operator's local experiment file
  (``fedloom client --config LOCAL.toml``).

Anything else is refused before any import, so a server (or whoever impersonates it)
cannot make a client run code its operator did not choose.

Notes
-----
Threat model: the server is trusted with the experiment's numbers (learning rates,
rounds, model sizes), not with the client's machine. A value like ``"os:system"`` or
``"evil.py:run"`` would otherwise be imported and called by the client. Keyword
arguments (``model.kwargs``) stay the server's to choose: they are data passed to
code the client already accepted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from fedloom.config.schema import ExperimentConfig
from fedloom.core.errors import FedloomError

__all__ = ["CODE_KEYS", "UntrustedConfigError", "check_server_config", "names_code"]

# Dotted config keys whose value can name code (an import path or a file). A key that the
# schema does not have (yet) is skipped, so a new code-naming key is one line here.
CODE_KEYS: Sequence[str] = ("model.name", "task", "data.dataset")


class UntrustedConfigError(FedloomError):
    """The server's configuration names code that this client's operator did not configure."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__(
            "refusing to join: the server's configuration names code this client was not configured "
            "to run:\n" + "\n".join(f"  - {p}" for p in self.problems)
        )


def names_code(value: str) -> bool:
    """Whether a config value names code to import (``module:attr`` or a ``.py`` file), not a registry name."""
    return ":" in value or value.endswith(".py") or "/" in value


_MISSING = object()


def _get(cfg: BaseModel, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part, _MISSING)
        if node is _MISSING:
            return _MISSING
    return node


def check_server_config(server_cfg: ExperimentConfig, local_cfg: ExperimentConfig | None) -> list[str]:
    """Every code-naming key where the server's value is not allowed (empty: the config is acceptable).

    Each problem names the key, the server's value and the local value (or that there is
    no local configuration). Nothing is imported.
    """
    problems: list[str] = []
    for key in CODE_KEYS:
        theirs = _get(server_cfg, key)
        if theirs is _MISSING or theirs is None or not names_code(str(theirs)):
            continue
        if local_cfg is None:
            problems.append(
                f"{key}: the server asks for {str(theirs)!r}, and this client has no local configuration "
                "(only built-in names are accepted without one; start the client with --config "
                f"LOCAL.toml setting {key} = {str(theirs)!r} if this site's operator chose that code)"
            )
            continue
        ours = _get(local_cfg, key)
        if ours is _MISSING or ours != theirs:
            mine = "unset" if ours is _MISSING or ours is None else repr(str(ours))
            problems.append(
                f"{key}: the server asks for {str(theirs)!r}, but this client's local configuration has {mine}"
            )
    return problems
