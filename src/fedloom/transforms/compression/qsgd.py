"""Stochastic, unbiased b-bit quantisation of the update (QSGD).

Alistarh et al. 2017, "QSGD: Communication-Efficient SGD via Gradient
Quantization and Encoding", arXiv 1610.02132, with the max-norm scaling of the
paper's experiments: the flat delta is cut into segments (one per parameter
tensor, or blocks of ``block`` coordinates), each with scale
``m = max_i |x_i|`` (float32), and every coordinate becomes one of
``2L + 1`` levels, ``L = 2^(bits-1) - 1``::

    y_i = L * x_i / m                      # in [-L, L]
    q_i = floor(y_i) + Bernoulli(y_i - floor(y_i))
    x_hat_i = q_i * m / L

so ``E[x_hat] = x`` (unbiased). The code ``q_i + L`` fits ``bits`` bits and is
packed ``8 / bits`` to a byte. Variance: per coordinate
``(m/L)^2 p_i (1 - p_i)`` with ``p_i`` the fractional part of ``|y_i|``,
summed ``<= (m/L)^2 min(d/4, L ||x||_1 / m) <= min(d / L^2, sqrt(d) / L) ||x||_2^2``
over a segment of ``d`` coordinates (as ``m <= ||x||_2``), within QSGD's
Lemma 3.1 bound ``min(d/s^2, sqrt(d)/s) ||x||_2^2`` for ``s = L`` levels.
``bits = 2`` is ternary (levels -m, 0, m).

Wire size: ``ceil(d * bits / 8)`` bytes of codes plus 4 bytes per segment.

Randomness: the Bernoulli draws come from
``torch_rng(seed, "qsgd", round=round, client=client)``, so a run is
bit-reproducible whatever the executor, worker count or order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fedloom.algorithms.api import Aggregate, ClientUpdate, ServerContext
from fedloom.core.errors import UpdateError
from fedloom.core.params import Params
from fedloom.core.rng import torch_rng
from fedloom.transforms.compression.packed import (
    check_meta,
    flatten,
    pack_codes,
    packed_update,
    refuse_non_finite,
    unflatten,
    unpack_codes,
    unpacked_update,
)
from fedloom.transforms.compression.packed import field as packed_field

__all__ = ["Qsgd", "dequantize", "quantize", "segment_lengths", "variance_bound"]

QSGD_PURPOSE = "qsgd"
_CODE = 3
BITS = (2, 4, 8)


def segment_lengths(template: Params, block: int) -> list[int]:
    """Lengths of the scale segments of ``template``'s flat vector: per tensor (``block = 0``) or blocks."""
    n = template.num_elements()
    if block > 0:
        return [min(block, n - s) for s in range(0, n, block)]
    return [v.numel() for v in template.values() if v.numel() > 0]


def quantize(
    flat: torch.Tensor, lengths: list[int], bits: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scales)``: unsigned codes ``q + L`` (``uint8``, one per coordinate) and float32 scales."""
    levels = (1 << (bits - 1)) - 1
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.int64))
    scales = torch.zeros(len(lengths), dtype=torch.float32)
    if flat.numel():
        scales = scales.scatter_reduce(0, seg, flat.abs(), reduce="amax", include_self=True)
    per = scales[seg]  # [d]
    safe = torch.where(per > 0, per, torch.ones_like(per))
    y = flat * (levels / safe)  # [d], in [-L, L]
    low = torch.floor(y)
    up = torch.rand(flat.shape, generator=generator, dtype=torch.float32) < (y - low)
    q = (low + up.to(torch.float32)).clamp_(-levels, levels)
    return (q + levels).to(torch.uint8), scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, lengths: list[int], bits: int) -> torch.Tensor:
    """``x_hat = (code - L) * m / L`` as float32 (``[d]``)."""
    levels = (1 << (bits - 1)) - 1
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.int64))
    q = codes.to(torch.float32) - levels
    return q * (scales[seg] / levels)


def variance_bound(x: torch.Tensor, bits: int) -> float:
    """QSGD's bound ``min(d/s^2, sqrt(d)/s) ||x||^2`` on ``E||x_hat - x||^2`` for one segment, ``s = L``."""
    s = (1 << (bits - 1)) - 1
    d = x.numel()
    return min(d / s**2, math.sqrt(d) / s) * float(x.to(torch.float64).square().sum())


@dataclass(frozen=True)
class Qsgd:
    """Stochastic ``bits``-bit quantisation with per-tensor (``block = 0``) or per-block scales."""

    bits: int = 8
    block: int = 0
    template: Params | None = field(default=None, compare=False, repr=False)
    packs = True

    def __post_init__(self) -> None:
        problems = []
        if self.bits not in BITS:
            problems.append(f"Qsgd.bits must be one of {BITS}, got {self.bits}")
        if self.block < 0:
            problems.append(f"Qsgd.block must be >= 0 (0 = one scale per tensor), got {self.block}")
        if problems:
            raise ValueError("; ".join(problems))

    def with_model(self, params: Params) -> Qsgd:
        return Qsgd(self.bits, self.block, params)

    def _meta(self, n: int) -> tuple[int, ...]:
        return (_CODE, self.bits, self.block, n, n)

    def client(self, update: ClientUpdate, ctx: ServerContext) -> ClientUpdate:
        refuse_non_finite(update, f"qsgd{self.bits}")
        flat = flatten(update.delta)
        gen = torch_rng(ctx.seed, QSGD_PURPOSE, round=ctx.round, client=update.client_id)
        codes, scales = quantize(flat, segment_lengths(update.delta, self.block), self.bits, gen)
        tensors = {"codes": pack_codes(codes, self.bits), "scales": scales}
        return packed_update(update, tensors, self._meta(flat.numel()))

    def decode(self, update: ClientUpdate, ctx: ServerContext) -> ClientUpdate:
        if self.template is None:
            raise RuntimeError("Qsgd.decode needs the model: bind it with bind_model()")
        name = f"qsgd{self.bits}"
        n = self.template.num_elements()
        check_meta(update, name, self._meta(n))
        lengths = segment_lengths(self.template, self.block)
        packed = packed_field(update, "codes", torch.uint8, math.ceil(n * self.bits / 8), name)
        scales = packed_field(update, "scales", torch.float32, len(lengths), name)
        if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
            raise UpdateError(
                f"client {update.client_id}: {name} payload field 'scales' must be finite and >= 0"
            )
        codes = unpack_codes(packed, self.bits, n)
        if bool((codes > 2 * ((1 << (self.bits - 1)) - 1)).any()):
            raise UpdateError(
                f"client {update.client_id}: {name} payload field 'codes' holds a code above "
                f"{2 * ((1 << (self.bits - 1)) - 1)}"
            )
        flat = dequantize(codes, scales, lengths, self.bits)
        return unpacked_update(update, unflatten(flat, self.template))

    def server(self, aggregate: Aggregate, ctx: ServerContext) -> Aggregate:
        return aggregate
