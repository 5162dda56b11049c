"""t-of-m Shamir secret sharing of 32-byte secrets over the prime field GF(2^31 - 1).

A secret is cut into sixteen 16-bit chunks; each chunk is the constant term of
its own random polynomial of degree ``t - 1`` over GF(p), ``p = 2^31 - 1``, and
a share is that polynomial family evaluated at the holder's point ``x``
(``x = client_id + 1``, never 0). Chunks are shared independently, so any
``t - 1`` shares are jointly uniform and reveal nothing about the secret, and
any ``t`` recover it by Lagrange interpolation at 0 (Shamir 1979).

Arithmetic is vectorised in ``int64``: operands are below ``p < 2^31``, so a
product is below ``2^62`` and product-plus-operand below ``2^63`` -- reduce
after every multiply-add and nothing overflows.

Notes
-----
Threat model: polynomial coefficients are drawn from the OS CSPRNG
(``os.urandom``) by rejection sampling, so they are exactly uniform over GF(p);
never from the experiment seed. Shares carry no integrity protection of their
own (they travel inside AEAD, see :mod:`keys`); :func:`combine` rejects a
reconstruction whose chunks fall outside 16 bits, which catches most
inconsistent share sets, and the protocol checks a reconstructed mask key
against its advertised public key.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from fedloom.secagg.errors import ProtocolViolation

__all__ = ["PRIME", "SHARE_BYTES", "combine", "split"]

PRIME = (1 << 31) - 1
SECRET_BYTES = 32
_CHUNKS = SECRET_BYTES // 2  # 16-bit chunks
SHARE_BYTES = 4 * _CHUNKS


def _uniform_field(shape: tuple[int, ...]) -> NDArray[np.int64]:
    """Exactly uniform elements of GF(p) from the OS CSPRNG (31-bit draws, rejecting p itself)."""
    count = int(np.prod(shape))
    out = np.empty(0, dtype=np.int64)
    while out.size < count:
        draw = np.frombuffer(os.urandom(4 * (count - out.size)), dtype="<u4").astype(np.int64) & PRIME
        out = np.concatenate([out, draw[draw < PRIME]])
    return out.reshape(shape)


def split(secret: bytes, points: Sequence[int], threshold: int) -> list[bytes]:
    """Shares of ``secret`` (32 bytes) for holders at ``points``; any ``threshold`` of them recover it.

    ``points`` are distinct integers in ``[1, p)``; share ``i`` (``SHARE_BYTES``
    long) belongs to ``points[i]``.
    """
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"Shamir secrets are {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= len(points):
        raise ValueError(f"threshold must be in [1, {len(points)}], got {threshold}")
    if len(set(points)) != len(points) or any(not 0 < x < PRIME for x in points):
        raise ValueError("share points must be distinct integers in [1, 2^31 - 1)")
    chunks = np.frombuffer(secret, dtype="<u2").astype(np.int64)  # [C]
    coeffs = _uniform_field((threshold - 1, _CHUNKS))  # [t-1, C]: degree 1 .. t-1
    xs = np.asarray(points, dtype=np.int64)[:, None]  # [m, 1]
    acc = np.zeros((len(points), _CHUNKS), dtype=np.int64)  # [m, C]
    for c in coeffs[::-1]:  # Horner, highest degree first
        acc = (acc * xs + c) % PRIME
    acc = (acc * xs + chunks) % PRIME
    return [row.astype("<u4").tobytes() for row in acc]


@functools.lru_cache(maxsize=64)
def _lagrange_at_zero(points: tuple[int, ...]) -> tuple[int, ...]:
    """``lambda_i = prod_{j != i} x_j / (x_j - x_i) mod p``; cached: one holder set serves many secrets."""
    out = []
    for i, xi in enumerate(points):
        num, den = 1, 1
        for j, xj in enumerate(points):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(out)


def combine(points: Sequence[int], shares: Sequence[bytes], threshold: int) -> bytes:
    """Recover a secret from at least ``threshold`` shares (the first ``threshold`` are used).

    Raises :class:`ProtocolViolation` when there are too few shares, a share has
    the wrong size, or the result is not a valid chunked secret.
    """
    if len(points) != len(shares):
        raise ValueError(f"{len(points)} points but {len(shares)} shares")
    if len(set(points)) != len(points):
        raise ProtocolViolation("duplicate share points")
    if len(shares) < threshold:
        raise ProtocolViolation(f"{len(shares)} shares cannot recover a {threshold}-of-m secret")
    lam = _lagrange_at_zero(tuple(int(x) for x in points[:threshold]))
    acc = np.zeros(_CHUNKS, dtype=np.int64)
    for li, share in zip(lam, shares[:threshold], strict=True):
        if len(share) != SHARE_BYTES:
            raise ProtocolViolation(f"a share is {SHARE_BYTES} bytes, got {len(share)}")
        y = np.frombuffer(share, dtype="<u4").astype(np.int64)
        if np.any(y >= PRIME):
            raise ProtocolViolation("a share holds a value outside GF(2^31 - 1)")
        acc = (acc + li * y) % PRIME
    if np.any(acc >= 1 << 16):
        raise ProtocolViolation("shares are inconsistent: the reconstruction is not a valid secret")
    return acc.astype("<u2").tobytes()
