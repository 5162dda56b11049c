"""The secure-aggregation wire messages: plain frozen dataclasses of ints and bytes.

One round of Bonawitz et al. 2017 (ePrint 2017/281) exchanges, in order::

    round 0  client -> server  AdvertiseKeys     server -> client  Roster
    round 1  client -> server  ShareKeys         server -> client  ShareInbox
    round 2  client -> server  MaskedInput       server -> client  UnmaskRequest
    round 3  client -> server  UnmaskResponse    (server outputs the sum)

Messages hold only ints, bytes and tuples of messages, so the same state
machines run in-process (simulation) or over any transport that can carry
bytes (deployment); :func:`wire_size` counts what a transport would carry.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fedloom.core.errors import ConfigError

__all__ = [
    "AdvertiseKeys",
    "EncryptedShare",
    "MaskedInput",
    "RevealedShare",
    "Roster",
    "RoundParams",
    "ShareInbox",
    "ShareKeys",
    "UnmaskRequest",
    "UnmaskResponse",
    "wire_size",
]


@dataclass(frozen=True)
class RoundParams:
    """Public parameters every party of one round agrees on.

    ``session`` (>= 16 bytes) must be unique per round: keys, seeds and AEAD data
    are bound to it. ``threshold`` is the Shamir ``t`` of each share group (a
    client plus its neighbours); vectors are ``length`` elements of Z_{2^bits}.
    """

    session: bytes
    threshold: int
    bits: int
    length: int

    def __post_init__(self) -> None:
        problems = []
        if len(self.session) < 16:
            problems.append(f"RoundParams.session must be at least 16 bytes, got {len(self.session)}")
        if self.threshold < 1:
            problems.append(f"RoundParams.threshold must be >= 1, got {self.threshold}")
        if not 1 <= self.bits <= 63:
            problems.append(f"RoundParams.bits must be in [1, 63], got {self.bits}")
        if self.length < 1:
            problems.append(f"RoundParams.length must be >= 1, got {self.length}")
        if problems:
            raise ConfigError(problems)


@dataclass(frozen=True)
class AdvertiseKeys:
    """Round 0: a client's two X25519 public keys (``c`` encrypts shares, ``s`` derives masks)."""

    sender: int
    c_public: bytes
    s_public: bytes


@dataclass(frozen=True)
class Roster:
    """Round 0 reply: the advertised keys of ``receiver``'s neighbours that are still present."""

    receiver: int
    peers: tuple[AdvertiseKeys, ...]


@dataclass(frozen=True)
class EncryptedShare:
    """An AEAD-sealed pair of Shamir shares (of ``b_sender`` and ``s_sender^SK``) for ``receiver``."""

    sender: int
    receiver: int
    ciphertext: bytes


@dataclass(frozen=True)
class ShareKeys:
    """Round 1: one sealed share per neighbour, for the server to relay."""

    sender: int
    shares: tuple[EncryptedShare, ...]


@dataclass(frozen=True)
class ShareInbox:
    """Round 1 reply: the sealed shares addressed to ``receiver``; their senders form its U2 neighbourhood."""

    receiver: int
    shares: tuple[EncryptedShare, ...]


@dataclass(frozen=True)
class MaskedInput:
    """Round 2: ``y_u`` as little-endian words of Z_{2^bits} (see ``fixedpoint.to_wire``)."""

    sender: int
    masked: bytes


@dataclass(frozen=True)
class UnmaskRequest:
    """Round 2 reply: the clients whose masked input arrived (U3)."""

    survivors: tuple[int, ...]


@dataclass(frozen=True)
class RevealedShare:
    """A plaintext Shamir share of ``owner``'s secret, held by ``holder`` (point ``holder + 1``)."""

    owner: int
    holder: int
    share: bytes


@dataclass(frozen=True)
class UnmaskResponse:
    """Round 3: self-mask shares for surviving owners, mask-key shares for dropped ones -- never both."""

    sender: int
    self_mask_shares: tuple[RevealedShare, ...]
    key_shares: tuple[RevealedShare, ...]


_INT_BYTES = 4  # a transport would send client ids as 32-bit integers


def wire_size(message: object) -> int:
    """Bytes a compact transport needs for ``message``: payload bytes plus 4 per integer."""
    if isinstance(message, bytes):
        return len(message)
    if isinstance(message, int):
        return _INT_BYTES
    if isinstance(message, tuple):
        return sum(wire_size(m) for m in message)
    if dataclasses.is_dataclass(message) and not isinstance(message, type):
        return sum(wire_size(getattr(message, f.name)) for f in dataclasses.fields(message))
    raise TypeError(f"not a secure-aggregation message: {type(message).__name__}")
