"""Half-precision casts of the update: float16 and bfloat16.

The delta travels as one flat 16-bit vector (half of float32's bytes) and is
widened back on the server. float16 (IEEE 754 binary16) keeps 11 significant
bits but only magnitudes up to 65504; bfloat16 keeps float32's exponent range
with 8 significant bits (Kalamkar et al. 2019, "A Study of BFLOAT16 for Deep
Learning Training", arXiv 1905.12322; Micikevicius et al. 2018, "Mixed Precision
Training", arXiv 1710.03740). Rounding is to nearest, so the cast is
deterministic and needs no seed; its relative error per coordinate is at most
``2^-11`` (float16, inside its range) or ``2^-8`` (bfloat16).

A delta with NaN or infinity is refused before encoding; a float16 cast also
refuses a coordinate beyond 65504 (it would become infinite), naming the
parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from fedloom.algorithms.api import Aggregate, ClientUpdate, ServerContext
from fedloom.core.errors import UpdateError
from fedloom.core.params import Params
from fedloom.transforms.compression.packed import (
    check_meta,
    flatten,
    packed_update,
    refuse_non_finite,
    unflatten,
    unpacked_update,
)
from fedloom.transforms.compression.packed import field as packed_field

__all__ = ["HalfCast"]

_CODES = {"fp16": 1, "bf16": 2}
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
FP16_MAX = 65504.0


@dataclass(frozen=True)
class HalfCast:
    """Send the delta as ``fp16`` or ``bf16`` (see the module docstring)."""

    precision: Literal["fp16", "bf16"] = "fp16"
    template: Params | None = field(default=None, compare=False, repr=False)
    packs = True

    def with_model(self, params: Params) -> HalfCast:
        return HalfCast(self.precision, params)

    def encode(self, update: ClientUpdate) -> ClientUpdate:
        refuse_non_finite(update, self.precision)
        flat = flatten(update.delta)
        if self.precision == "fp16" and flat.numel() and float(flat.abs().max()) > FP16_MAX:
            worst = max(update.delta, key=lambda k: float(update.delta[k].abs().max()))
            raise UpdateError(
                f"client {update.client_id}: fp16 cannot hold parameter {worst!r} (|value| up to "
                f"{float(update.delta[worst].abs().max()):.6g} > {FP16_MAX}); use compression.codec = 'bf16'"
            )
        values = flat.to(_DTYPES[self.precision])
        return packed_update(update, {"values": values}, self._meta(flat.numel()))

    def _meta(self, n: int) -> tuple[int, ...]:
        return (_CODES[self.precision], 16, 0, n, n)

    def client(self, update: ClientUpdate, ctx: ServerContext) -> ClientUpdate:
        return self.encode(update)

    def decode(self, update: ClientUpdate, ctx: ServerContext) -> ClientUpdate:
        if self.template is None:
            raise RuntimeError("HalfCast.decode needs the model: bind it with bind_model()")
        n = self.template.num_elements()
        check_meta(update, self.precision, self._meta(n))
        values = packed_field(update, "values", _DTYPES[self.precision], n, self.precision)
        if not bool(torch.isfinite(values).all()):
            raise UpdateError(
                f"client {update.client_id}: {self.precision} payload field 'values' holds NaN or inf"
            )
        return unpacked_update(update, unflatten(values.to(torch.float32), self.template))

    def server(self, aggregate: Aggregate, ctx: ServerContext) -> Aggregate:
        return aggregate
