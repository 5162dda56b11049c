"""The client side of SecAgg (Bonawitz et al. 2017, ePrint 2017/281) as a state machine.

Each round is a function ``(state, message from server) -> (new state, message to server)``:

``advertise_keys``  round 0: fresh X25519 key pairs ``c_u``, ``s_u``.
``share_keys``      round 1: draw the self-mask seed ``b_u``; Shamir-share ``b_u`` and
                    ``s_u^SK`` t-of-m over the share group (neighbours + self); seal
                    each neighbour's pair of shares with ChaCha20-Poly1305.
``masked_input``    round 2: open the received shares, then send
                    ``y_u = x_u + PRG(b_u) + sum_{v>u} PRG(s_uv) - sum_{v<u} PRG(s_uv) mod 2^bits``
                    over the neighbours ``v`` that completed round 1.
``unmask``          round 3: for each group member, reveal the ``b`` share if it
                    survived round 2, else the ``s^SK`` share -- never both.

States are frozen dataclasses; every call returns a new one.

Notes
-----
Threat model: honest-but-curious server, possibly colluding with fewer than
``threshold`` clients of a group (see :mod:`keys` for what active security would
add). The client enforces the two checks that keep its input hidden: it
refuses (:class:`SecAggAbort`) to mask or unmask when fewer than ``threshold``
group members remain, and it answers the unmasking request only once, revealing
exactly one kind of share per owner. Secrets (``b_u``, private keys, Shamir
coefficients) come from the OS CSPRNG only; the sum does not depend on them.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from numpy.typing import NDArray

from fedloom.secagg import keys, shamir
from fedloom.secagg.errors import ProtocolViolation, SecAggAbort
from fedloom.secagg.fixedpoint import to_wire
from fedloom.secagg.messages import (
    AdvertiseKeys,
    EncryptedShare,
    MaskedInput,
    RevealedShare,
    Roster,
    RoundParams,
    ShareInbox,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from fedloom.secagg.prg import SEED_BYTES, expand_mask

__all__ = [
    "ClientKeys",
    "ClientMasked",
    "ClientSharing",
    "advertise_keys",
    "masked_input",
    "share_keys",
    "unmask",
]

_HEADER = struct.Struct("<QQ")


@dataclass(frozen=True)
class ClientKeys:
    """After round 0: the client's private keys for this round."""

    params: RoundParams
    client_id: int
    c_key: X25519PrivateKey
    s_key: X25519PrivateKey


@dataclass(frozen=True)
class ClientSharing:
    """After round 1: the roster, the self-mask seed and this client's own shares."""

    keys: ClientKeys
    peers: Mapping[int, AdvertiseKeys]
    inbound_keys: Mapping[int, bytes]  # peer -> AEAD key for shares from that peer
    self_seed: bytes
    own_shares: tuple[bytes, bytes]  # (share of b_u, share of s_u^SK) at point u + 1


@dataclass(frozen=True)
class ClientMasked:
    """After round 2: the shares held for each group member (owner -> (b share, s^SK share))."""

    sharing: ClientSharing
    held: Mapping[int, tuple[bytes, bytes]]


def advertise_keys(params: RoundParams, client_id: int) -> tuple[ClientKeys, AdvertiseKeys]:
    """Round 0: generate the two key pairs and advertise their public halves."""
    if not 0 <= client_id < shamir.PRIME - 1:
        raise ProtocolViolation(f"client id must be in [0, 2^31 - 2), got {client_id}")
    c_key, s_key = keys.generate_private_key(), keys.generate_private_key()
    state = ClientKeys(params, client_id, c_key, s_key)
    return state, AdvertiseKeys(client_id, keys.public_bytes(c_key), keys.public_bytes(s_key))


def _check_group(params: RoundParams, me: int, size: int, what: str) -> None:
    if size < params.threshold:
        raise SecAggAbort(f"client {me}: {what}", needed=params.threshold, available=size)


def share_keys(state: ClientKeys, roster: Roster) -> tuple[ClientSharing, ShareKeys]:
    """Round 1: share ``b_u`` and ``s_u^SK`` over the group and seal each neighbour's shares."""
    me, params = state.client_id, state.params
    peers = {p.sender: p for p in roster.peers}
    if roster.receiver != me or me in peers or len(peers) != len(roster.peers):
        raise ProtocolViolation(f"client {me}: malformed roster (for {roster.receiver}, duplicates or self)")
    _check_group(params, me, len(peers) + 1, "too few neighbours advertised keys")
    self_seed = os.urandom(SEED_BYTES)
    holders = sorted([me, *peers])
    points = [h + 1 for h in holders]
    b_shares = shamir.split(self_seed, points, params.threshold)
    s_shares = shamir.split(keys.private_bytes(state.s_key), points, params.threshold)
    sealed, own, inbound = [], (b"", b""), {}
    for h, b_share, s_share in zip(holders, b_shares, s_shares, strict=True):
        if h == me:
            own = (b_share, s_share)
            continue
        shared = keys.agree(state.c_key, peers[h].c_public, peer=h)
        key = keys.derive_share_key(shared, params.session, me, h)
        # Derive the reverse key now: one X25519 exchange per neighbour serves both rounds.
        inbound[h] = keys.derive_share_key(shared, params.session, h, me)
        plaintext = _HEADER.pack(me, h) + b_share + s_share
        sealed.append(EncryptedShare(me, h, keys.seal_share(key, params.session, me, h, plaintext)))
    return ClientSharing(state, peers, inbound, self_seed, own), ShareKeys(me, tuple(sealed))


def _open(state: ClientSharing, item: EncryptedShare) -> tuple[bytes, bytes]:
    me, params = state.keys.client_id, state.keys.params
    sender = item.sender
    if item.receiver != me or sender not in state.peers:
        raise ProtocolViolation(
            f"client {me}: got a share from {sender} to {item.receiver}, not a neighbour's"
        )
    plaintext = keys.open_share(state.inbound_keys[sender], params.session, sender, me, item.ciphertext)
    n = shamir.SHARE_BYTES
    if len(plaintext) != _HEADER.size + 2 * n or _HEADER.unpack_from(plaintext) != (sender, me):
        raise ProtocolViolation(f"client {me}: the share from client {sender} has a malformed body")
    body = plaintext[_HEADER.size :]
    return body[:n], body[n:]


def masked_input(
    state: ClientSharing, inbox: ShareInbox, x: NDArray[np.uint64]
) -> tuple[ClientMasked, MaskedInput]:
    """Round 2: open the inbox (raising :class:`ShareDecryptionError` on tampering) and mask ``x``.

    ``x`` is this client's encoded input: ``length`` values in ``[0, 2^bits)``.
    """
    me, params = state.keys.client_id, state.keys.params
    x = np.asarray(x)
    if x.dtype != np.uint64 or x.shape != (params.length,) or np.any(x >> np.uint64(params.bits)):
        raise ProtocolViolation(
            f"client {me}: input must be uint64 of shape ({params.length},) with values < 2^{params.bits}"
        )
    if inbox.receiver != me:
        raise ProtocolViolation(f"client {me}: got the inbox of client {inbox.receiver}")
    held: dict[int, tuple[bytes, bytes]] = {me: state.own_shares}
    for item in inbox.shares:
        if item.sender in held:
            raise ProtocolViolation(f"client {me}: two shares from client {item.sender}")
        held[item.sender] = _open(state, item)
    _check_group(params, me, len(held), "too few neighbours completed the share round")
    y = x + expand_mask(state.self_seed, params.length, params.bits)  # [length], mod 2^64
    for v in sorted(held):
        if v == me:
            continue
        shared = keys.agree(state.keys.s_key, state.peers[v].s_public, peer=v)
        mask = expand_mask(keys.derive_mask_seed(shared, params.session, me, v), params.length, params.bits)
        if v > me:
            y += mask
        else:
            y -= mask
    y &= np.uint64((1 << params.bits) - 1)
    return ClientMasked(state, held), MaskedInput(me, to_wire(y, params.bits))


def unmask(state: ClientMasked, request: UnmaskRequest) -> UnmaskResponse:
    """Round 3: reveal, per group member, the ``b`` share (survivor) or the ``s^SK`` share (dropped)."""
    me, params = state.sharing.keys.client_id, state.sharing.keys.params
    survivors = set(request.survivors)
    if me not in survivors or len(survivors) != len(request.survivors):
        raise ProtocolViolation(f"client {me}: malformed survivor list (duplicates, or without this client)")
    _check_group(params, me, len(survivors & set(state.held)), "too few neighbours sent masked inputs")
    b_out, s_out = [], []
    for owner in sorted(state.held):
        b_share, s_share = state.held[owner]
        if owner in survivors:
            b_out.append(RevealedShare(owner, me, b_share))
        else:
            s_out.append(RevealedShare(owner, me, s_share))
    return UnmaskResponse(me, tuple(b_out), tuple(s_out))
