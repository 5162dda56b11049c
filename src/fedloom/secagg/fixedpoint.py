"""Fixed-point encoding of float vectors into Z_{2^bits}, and the modular sum.

Secure aggregation adds vectors modulo ``R = 2^bits`` (masks are uniform over
Z_R, so they cancel exactly). Floats therefore enter as signed integers:

``q = rint(clip(x, -c, c) * s)`` with ``s = Q / c`` and ``Q = (2^(bits-1) - 1) // max_clients``,

stored in two's complement modulo ``R``. Each ``|q| <= Q``, so the sum of up
to ``max_clients`` encodings has ``|sum q| <= 2^(bits-1) - 1`` and decodes
uniquely from its residue.

Error bound (stated and tested): for ``n <= max_clients`` inputs already inside
``[-c, c]``, every coordinate of the decoded sum differs from the exact real sum
by at most :func:`sum_error_bound` ``= n * (1/2 + 2^(bits-54)) / s + n * c * 2^-52``:
half a quantisation step per client (widened by float64 rounding of ``x * s``)
plus the rounding of the final division. Inputs outside ``[-c, c]`` are clipped
first; that clipping bias is *not* part of the bound (clip norms upstream, e.g.
with ``NormClip(max_norm <= c)``, which implies every ``|x_i| <= c``).

Vectors in Z_R are NumPy ``uint64`` arrays with values in ``[0, R)``; NumPy
array arithmetic on ``uint64`` wraps modulo ``2^64``, and ``R`` divides ``2^64``,
so reducing with ``& (R - 1)`` at the end is exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from fedloom.core.errors import ConfigError, UpdateError

__all__ = [
    "FixedPoint",
    "decode_sum",
    "encode",
    "from_wire",
    "sum_error_bound",
    "sum_mod",
    "to_wire",
    "wire_bytes_per_element",
]

MIN_BITS = 8
MAX_BITS = 53  # the integer sum must convert to float64 exactly


@dataclass(frozen=True)
class FixedPoint:
    """Encoding parameters: clip range ``[-clip, clip]``, ring ``Z_{2^bits}``, client capacity.

    Raises :class:`ConfigError` (listing every problem) unless ``clip > 0``,
    ``8 <= bits <= 53`` and ``1 <= max_clients`` leaves at least one level per client.
    """

    clip: float
    bits: int = 32
    max_clients: int = 1000
    # A power-of-two scale (the largest not above Q / clip): dividing by it is exact in float arithmetic.
    pow2: bool = False

    def __post_init__(self) -> None:
        problems = []
        if not self.clip > 0 or not np.isfinite(self.clip):
            problems.append(f"FixedPoint.clip must be a finite number > 0, got {self.clip}")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            problems.append(f"FixedPoint.bits must be in [{MIN_BITS}, {MAX_BITS}], got {self.bits}")
        elif self.max_clients < 1 or (1 << (self.bits - 1)) - 1 < self.max_clients:
            problems.append(
                f"FixedPoint.max_clients must be in [1, 2^(bits-1) - 1] = [1, {(1 << (self.bits - 1)) - 1}], "
                f"got {self.max_clients}"
            )
        if problems:
            raise ConfigError(problems)

    @property
    def modulus(self) -> int:
        """``R = 2^bits``."""
        return 1 << self.bits

    @property
    def levels(self) -> int:
        """``Q``: the largest ``|q|`` a single client may contribute."""
        return ((1 << (self.bits - 1)) - 1) // self.max_clients

    @property
    def scale(self) -> float:
        """``s = Q / clip``: integer steps per unit of the input (with ``pow2``, the largest power of two below)."""
        if self.pow2:
            return float(2.0 ** math.floor(math.log2(self.levels / self.clip)))
        return self.levels / self.clip


def encode(x: NDArray[np.floating], fp: FixedPoint) -> NDArray[np.uint64]:
    """Clip ``x`` to ``[-clip, clip]`` and encode it in Z_R (shape preserved, flattened to 1-D).

    Raises :class:`UpdateError` if ``x`` holds NaN or infinity.
    """
    xf = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(xf)):
        raise UpdateError(f"cannot encode a vector with {int(np.sum(~np.isfinite(xf)))} non-finite values")
    q = np.rint(np.clip(xf, -fp.clip, fp.clip) * fp.scale).astype(np.int64)  # |q| <= Q
    # int64 -> uint64 is two's complement, i.e. q mod 2^64; then reduce mod R.
    return q.astype(np.uint64) & np.uint64(fp.modulus - 1)


def sum_mod(vectors: Sequence[NDArray[np.uint64]], bits: int) -> NDArray[np.uint64]:
    """``sum_i vectors[i] mod 2^bits``; every vector must have the same length."""
    if not vectors:
        raise ValueError("sum_mod needs at least one vector")
    acc = np.zeros_like(vectors[0], dtype=np.uint64)
    for v in vectors:
        acc += v  # wraps modulo 2^64
    return acc & np.uint64((1 << bits) - 1)


def decode_sum(z: NDArray[np.uint64], fp: FixedPoint, *, num_clients: int) -> NDArray[np.float64]:
    """Decode the modular sum of ``num_clients`` encodings back to floats.

    Residues at or above ``R/2`` are negative. Raises :class:`ConfigError` if
    ``num_clients > fp.max_clients`` (the sum could have wrapped around).
    """
    if not 0 <= num_clients <= fp.max_clients:
        raise ConfigError([f"decode_sum: num_clients={num_clients} is outside [0, {fp.max_clients}]"])
    zi = (np.asarray(z, dtype=np.uint64) & np.uint64(fp.modulus - 1)).astype(np.int64)
    signed = np.where(zi >= (1 << (fp.bits - 1)), zi - fp.modulus, zi)
    return signed.astype(np.float64) / fp.scale


def sum_error_bound(fp: FixedPoint, num_clients: int) -> float:
    """Max per-coordinate ``|decode_sum(...) - sum_i x_i|`` for inputs already inside ``[-clip, clip]``."""
    per_client = (0.5 + 2.0 ** (fp.bits - 54)) / fp.scale
    return num_clients * per_client + num_clients * fp.clip * 2.0**-52


def wire_bytes_per_element(bits: int) -> int:
    """Bytes per coordinate when a Z_{2^bits} vector is sent: 1 up to 8 bits, 2 up to 16, 4 up to 32, else 8."""
    return 1 if bits <= 8 else 2 if bits <= 16 else 4 if bits <= 32 else 8


def _wire_dtype(bits: int) -> str:
    return {1: "<u1", 2: "<u2", 4: "<u4", 8: "<u8"}[wire_bytes_per_element(bits)]


def to_wire(v: NDArray[np.uint64], bits: int) -> bytes:
    """Little-endian bytes of a Z_{2^bits} vector (see :func:`wire_bytes_per_element`)."""
    return np.asarray(v, dtype=np.uint64).astype(_wire_dtype(bits)).tobytes()


def from_wire(data: bytes, bits: int, length: int) -> NDArray[np.uint64]:
    """Inverse of :func:`to_wire`; raises :class:`UpdateError` on a wrong size or out-of-range value."""
    width = wire_bytes_per_element(bits)
    if len(data) != width * length:
        raise UpdateError(
            f"a Z_2^{bits} vector of length {length} has {width * length} bytes, got {len(data)}"
        )
    v = np.frombuffer(data, dtype=_wire_dtype(bits)).astype(np.uint64)
    if bits not in (8, 16, 32, 64) and np.any(v >> np.uint64(bits)):
        raise UpdateError(f"vector holds values outside Z_2^{bits}")
    return v
