"""Mask expansion: a 32-byte seed -> a uniform vector over Z_{2^bits}.

The PRG is the ChaCha20 stream cipher from ``cryptography`` (RFC 7539 block
function, 256-bit key) keyed with the seed; the keystream is read as
little-endian 32-bit words (``bits <= 32``) or 64-bit words (``bits > 32``) and
reduced modulo ``2^bits``. Because ``2^bits`` divides the word range, each
coordinate is exactly uniform if the keystream is.

Notes
-----
Threat model: a seed is never used for two different masks. Self-mask seeds
``b_u`` are fresh CSPRNG output per round; pairwise seeds are HKDF outputs bound
to the session id and the (unordered) pair of clients (see :mod:`keys`). The
nonce can therefore be the constant zero: (key, nonce) pairs never repeat.
The expansion is deterministic so the server can recompute exactly the masks it
must remove once it reconstructs a seed.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from numpy.typing import NDArray

__all__ = ["SEED_BYTES", "expand_mask"]

SEED_BYTES = 32
# 16-byte ChaCha20 "nonce" in cryptography's layout: 4-byte counter || 12-byte nonce, all zero.
_NONCE = bytes(16)


def expand_mask(seed: bytes, length: int, bits: int) -> NDArray[np.uint64]:
    """The mask ``PRG(seed)``: ``length`` values uniform over ``[0, 2^bits)``, as ``uint64``.

    ``seed`` must be exactly 32 bytes and ``1 <= bits <= 64``.
    """
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed is {SEED_BYTES} bytes, got {len(seed)}")
    if length < 0 or not 1 <= bits <= 64:
        raise ValueError(f"expand_mask needs length >= 0 and 1 <= bits <= 64, got {length}, {bits}")
    width = 4 if bits <= 32 else 8
    encryptor = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor()
    stream = encryptor.update(bytes(width * length))  # keystream = E(0...0)
    words = np.frombuffer(stream, dtype="<u4" if width == 4 else "<u8").astype(np.uint64)
    if bits < 64:
        words &= np.uint64((1 << bits) - 1)
    return words
