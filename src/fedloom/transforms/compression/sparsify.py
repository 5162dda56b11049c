"""Top-k and random-k sparsification of the update, with error feedback.

Stich, Cordonnier and Jaggi 2018, "Sparsified SGD with Memory", arXiv 1809.07599
(error feedback, or memory); Aji and Heafield 2017 (top-k gradient dropping,
arXiv 1704.05021). Each round the client adds the residual it kept from its
previous rounds to its delta, sends ``k = max(1, ceil(fraction * d))``
coordinates of the sum, and keeps the rest as the new residual::

    a = delta + e                 # e: the client's residual (zeros at first)
    sent = S_k(a)                 # top-k by |a_i|, or k coordinates drawn at random
    e' = a - sent

so after ``T`` rounds ``sum_t sent_t + e_T == sum_t delta_t`` (up to float
rounding): nothing a client computes is lost, only delayed. The residual lives
in the client's state under ``transform.ef_residual`` (kept by the simulation's
run store across rounds and resumes, and by a deployed client on its disk).
With ``error_feedback = False`` the rest is dropped; random-k then scales the
sent values by ``d / k`` so the estimate stays unbiased.

Wire form: top-k sends ``k`` float32 values and their ``int32`` indices into the
flat delta (8 bytes per kept coordinate: top-1% costs 0.02 of float32); random-k
sends only the values, because the server draws the same indices from
``torch_rng(seed, "randk", round=round, client=client)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from fedloom.algorithms.api import Aggregate, ClientUpdate, ServerContext
from fedloom.algorithms.stragglers import DROPPED
from fedloom.core.errors import UpdateError
from fedloom.core.params import Params
from fedloom.core.rng import torch_rng
from fedloom.transforms.compression.packed import (
    check_meta,
    flatten,
    packed_update,
    refuse_non_finite,
    residual_of,
    unflatten,
    unpacked_update,
    with_residual,
)
from fedloom.transforms.compression.packed import field as packed_field

__all__ = ["Sparsify", "kept_count", "random_indices"]

RANDK_PURPOSE = "randk"
_CODES = {"topk": 4, "randk": 5}


def kept_count(n: int, fraction: float) -> int:
    """``k = max(1, ceil(fraction * n))`` coordinates kept out of ``n`` (0 when ``n = 0``)."""
    return 0 if n == 0 else min(n, max(1, math.ceil(fraction * n)))


def random_indices(n: int, k: int, seed: int, round: int, client: int) -> torch.Tensor:
    """The ``k`` sorted coordinates random-k sends for ``(seed, round, client)`` (``int64``)."""
    gen = torch_rng(seed, RANDK_PURPOSE, round=round, client=client)
    return torch.sort(torch.randperm(n, generator=gen)[:k]).values


@dataclass(frozen=True)
class Sparsify:
    """Send ``fraction`` of the coordinates (``kind`` = ``"topk"`` or ``"randk"``), with error feedback."""

    kind: Literal["topk", "randk"] = "topk"
    fraction: float = 0.01
    error_feedback: bool = True
    template: Params | None = field(default=None, compare=False, repr=False)
    packs = True

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ValueError(f"Sparsify.fraction must be in (0, 1], got {self.fraction}")

    def with_model(self, params: Params) -> Sparsify:
        return Sparsify(self.kind, self.fraction, self.error_feedback, params)

    def _meta(self, n: int) -> tuple[int, ...]:
        return (_CODES[self.kind], 32, 0, n, kept_count(n, self.fraction))

    def client(self, update: ClientUpdate, ctx: ServerContext) -> ClientUpdate:
        refuse_non_finite(update, self.kind)
        flat = flatten(update.delta)  # [d]
        n = flat.numel()
        k = kept_count(n, self.fraction)
        residual = residual_of(update) if self.error_feedback else None
        # A dropped straggler's answer is never aggregated: nothing of the residual may be spent on it.
        dropped = update.metrics.get(DROPPED, 0.0) != 0.0
        if residual is not None and not dropped:
            if list(residual) != list(update.delta) or residual.num_elements() != n:
                raise UpdateError(
                    f"client {update.client_id}: the kept error-feedback residual does not match the model "
                    f"(parameters {list(residual)[:4]}..., {residual.num_elements()} elements, expected {n})"
                )
            flat = flat + flatten(residual)
        if self.kind == "topk":
            idx = torch.sort(torch.topk(flat.abs(), k, sorted=False).indices).values
            values = flat[idx]
            tensors = {"values": values, "indices": idx.to(torch.int32)}
        else:
            idx = random_indices(n, k, ctx.seed, ctx.round, update.client_id)
            values = flat[idx] if self.error_feedback else flat[idx] * (n / k)
            tensors = {"values": values}
        out = packed_update(update, tensors, self._meta(n))
        if self.error_feedback and not dropped:
            rest = flat.clone()
            rest[idx] = 0.0
            out = with_residual(out, unflatten(rest, update.delta))
        return out

    def decode(self, update: ClientUpdate, ctx: ServerContext) -> ClientUpdate:
        if self.template is None:
            raise RuntimeError("Sparsify.decode needs the model: bind it with bind_model()")
        n = self.template.num_elements()
        k = kept_count(n, self.fraction)
        check_meta(update, self.kind, self._meta(n))
        values = packed_field(update, "values", torch.float32, k, self.kind)
        if not bool(torch.isfinite(values).all()):
            raise UpdateError(
                f"client {update.client_id}: {self.kind} payload field 'values' holds NaN or inf"
            )
        if self.kind == "topk":
            raw = packed_field(update, "indices", torch.int32, k, self.kind).to(torch.int64)
            if k and (int(raw.min()) < 0 or int(raw.max()) >= n):
                raise UpdateError(
                    f"client {update.client_id}: topk payload field 'indices' holds {int(raw.min())}..{int(raw.max())}, "
                    f"outside [0, {n})"
                )
            if k > 1 and not bool((raw[1:] > raw[:-1]).all()):
                raise UpdateError(
                    f"client {update.client_id}: topk payload field 'indices' must be strictly increasing"
                )
            idx = raw
        else:
            idx = random_indices(n, k, ctx.seed, ctx.round, update.client_id)
        flat = torch.zeros(n, dtype=torch.float32)
        flat[idx] = values
        return unpacked_update(update, unflatten(flat, self.template))

    def server(self, aggregate: Aggregate, ctx: ServerContext) -> Aggregate:
        return aggregate
