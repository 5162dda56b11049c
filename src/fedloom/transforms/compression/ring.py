"""Stochastic b-bit quantisation straight into the secure-aggregation ring.

Under secure aggregation the server only sees ``sum_u x_u mod 2^R``, so every
client must quantise on the same public grid: the fixed-point encoding of
:mod:`fedloom.secagg.fixedpoint` with the clip range ``[-c, c]`` of
``transforms.clip_norm``. With ``compression.codec = "qsgd"`` that encoding uses

* a ring width chosen from the codec's bits and the cohort:
  ``R = max(8, bits + ceil(log2 n))`` (:func:`ring_bits`), so one client's level
  ``|q| <= Q = (2^(R-1) - 1) // n`` is at least ``2^(bits-1) - 1`` and the sum
  of ``n`` clients can never wrap around (``|sum q| <= 2^(R-1) - 1``);
* a power-of-two scale ``s`` (the largest not above ``Q / c``), so
  ``q / s`` is exact in float arithmetic: the decoded sum equals the sum of the
  clients' dequantised vectors bit for bit;
* stochastic rounding ``q = floor(x s) + Bernoulli(frac(x s))`` (unbiased, as in
  QSGD, arXiv 1610.02132), from ``numpy_rng(seed, "ring-quant", round, client)``.

The masked vector then costs ``wire_bytes_per_element(R)`` bytes per coordinate
(1, 2 or 4): the masks are uniform over the whole ring, so the wire carries the
ring width, not ``bits``.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from fedloom.core.errors import UpdateError
from fedloom.secagg.fixedpoint import MAX_BITS, MIN_BITS, FixedPoint

__all__ = ["RING_PURPOSE", "dequantize_ring", "quantize_into_ring", "ring_bits", "ring_fixed_point"]

RING_PURPOSE = "ring-quant"


def ring_bits(bits: int, max_clients: int) -> int:
    """``R = max(8, bits + ceil(log2 max_clients))``: wide enough that ``max_clients`` b-bit inputs never wrap."""
    return min(MAX_BITS, max(MIN_BITS, bits + math.ceil(math.log2(max(1, max_clients)))))


def ring_fixed_point(clip: float, bits: int, max_clients: int) -> FixedPoint:
    """The fixed-point encoding for ``bits``-bit inputs of ``max_clients`` clients (power-of-two scale)."""
    return FixedPoint(clip, bits=ring_bits(bits, max_clients), max_clients=max_clients, pow2=True)


def quantize_into_ring(
    x: NDArray[np.floating], fp: FixedPoint, rng: np.random.Generator
) -> NDArray[np.uint64]:
    """Clip ``x`` to ``[-clip, clip]`` and round stochastically onto the ring (flattened, ``uint64``).

    Raises :class:`UpdateError` if ``x`` holds NaN or infinity.
    """
    xf = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(xf)):
        raise UpdateError(f"cannot quantise a vector with {int(np.sum(~np.isfinite(xf)))} non-finite values")
    y = np.clip(xf, -fp.clip, fp.clip) * fp.scale  # exact: the scale is a power of two
    low = np.floor(y)
    q = (low + (rng.random(y.shape) < (y - low))).astype(np.int64)
    q = np.clip(q, -fp.levels, fp.levels)
    return q.astype(np.uint64) & np.uint64(fp.modulus - 1)


def dequantize_ring(z: NDArray[np.uint64], fp: FixedPoint) -> NDArray[np.float64]:
    """One client's ring vector back to floats: its signed level over the scale (exact)."""
    zi = (np.asarray(z, dtype=np.uint64) & np.uint64(fp.modulus - 1)).astype(np.int64)
    signed = np.where(zi >= (1 << (fp.bits - 1)), zi - fp.modulus, zi)
    return signed.astype(np.float64) / fp.scale
