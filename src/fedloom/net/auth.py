"""Client authentication: per-client tokens and TLS credentials.

``fedloom certs --out DIR --clients a,b,c`` calls :func:`generate_credentials`,
which writes::

    DIR/ca.pem, DIR/ca.key              a private certificate authority
    DIR/server.pem, DIR/server.key      the server certificate (SANs: the given hosts)
    DIR/tokens.json                     SHA-256 digests of the client and operator tokens
    DIR/operator.{token,pem,key}        the operator's token and certificate (``fedloom status``)
    DIR/clients/<name>/{cert.pem,key.pem,token,ca.pem}   one bundle per client, to hand over

A directory that already holds credentials is never overwritten silently: ``--add``
issues bundles for new names with the existing CA, ``--force`` replaces everything.
Sites that make their own keys send a certificate signing request instead
(``fedloom certs request`` / ``fedloom certs sign``, :mod:`fedloom.net.pki`).

Notes
-----
Threat model: a client proves its identity with its token (a 256-bit secret sent
in call metadata, compared by digest in constant time) and, when TLS is on, with
its certificate (mutual TLS: the server requires a certificate signed by the CA,
and its common name must equal the claimed client name). Without TLS a token
travels in clear text, which is why TLS is on by default for every address that
is not loopback. Revocation (:func:`revoke`) marks a name in ``tokens.json``; the
server re-reads the file when it changes, so a revoked client is refused at its
next call without a restart. Keys are written with mode 0600.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedloom.core.errors import FedloomError

__all__ = ["AuthError", "Credentials", "TokenBook", "generate_credentials", "is_loopback", "revoke"]

TOKENS = "tokens.json"
OPERATOR = "operator"


class AuthError(FedloomError):
    """A caller is unknown, revoked or presented a wrong credential.

    The message is for the server's log; the caller is told it only when ``public`` (it proved
    who it is: a revoked client with its own token), else one message for every refusal.
    """

    def __init__(self, message: str, *, public: bool = False) -> None:
        super().__init__(message)
        self.public = public


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


@dataclass(frozen=True)
class Credentials:
    """Paths of one side's TLS material; any may be ``None`` (TLS off)."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def read(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        return tuple(p.read_bytes() if p is not None else None for p in (self.ca, self.cert, self.key))  # type: ignore[return-value]


class TokenBook:
    """The server's view of ``tokens.json``; re-read whenever the file changes."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise AuthError(f"token file {path} does not exist; create it with `fedloom certs`")
        self.path = path
        self._lock = threading.Lock()
        self._mtime = -1.0
        self._entries: dict[str, dict[str, Any]] = {}
        self._reload()

    def _reload(self) -> None:
        mtime = self.path.stat().st_mtime
        if mtime == self._mtime:
            return
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            entries = dict(raw["clients"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AuthError(f"token file {self.path} is unreadable: {exc}") from None
        self._entries, self._mtime = entries, mtime

    def check(self, name: str, token: str) -> None:
        """Raise :class:`AuthError` with the reason unless ``token`` is ``name``'s valid token."""
        with self._lock:
            self._reload()
            entry = self._entries.get(name)
        if entry is None:
            raise AuthError(f"unknown client {name!r}: not in {self.path.name}")
        # The token first: only a caller holding it may learn that the name is revoked.
        if not hmac.compare_digest(str(entry.get("sha256", "")), _digest(token)):
            raise AuthError(f"wrong token for client {name!r}")
        if entry.get("revoked", False):
            raise AuthError(f"client {name!r} has been revoked", public=True)


def revoke(directory: Path, name: str) -> None:
    """Mark ``name`` revoked in ``directory/tokens.json``."""
    path = directory / TOKENS
    raw = json.loads(path.read_text(encoding="utf-8"))
    if name not in raw["clients"]:
        raise AuthError(f"unknown client {name!r} in {path}")
    raw["clients"][name]["revoked"] = True
    tmp = path.with_name(TOKENS + ".tmp")
    tmp.write_text(json.dumps(raw, indent=2), encoding="utf-8")
    tmp.replace(path)


def generate_credentials(
    out: Path,
    clients: Sequence[str],
    *,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    days: int = 365,
    force: bool = False,
    add: bool = False,
) -> list[str]:
    """Write a CA, a server certificate, per-client certificates and tokens (see the module docstring).

    The work is :func:`fedloom.net.pki.generate_credentials` (which needs ``cryptography``):
    an ``out`` that already holds credentials is refused unless ``add`` or ``force``.
    """
    from fedloom.net.pki import generate_credentials as generate

    return generate(out, clients, hosts=hosts, days=days, force=force, add=add)
