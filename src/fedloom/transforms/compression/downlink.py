"""Compression of the broadcast (the downlink): float16, bfloat16 or 8-bit.

The server packs the global model's floating-point tensors before sending them
and every client widens them back to float32 before training; the client's
delta is taken against the widened model, and the server applies the average
delta to its own full-precision model, so the lossy broadcast costs only the
clients' starting point, never the server's state (as in Caldas et al. 2018,
"Expanding the Reach of Federated Learning by Reducing Client Resource
Requirements", arXiv 1812.07210, lossy compression of the server-to-client
model). The simulation applies the same round trip to its broadcast, so a
deployed run and its simulation train from identical models.

``"fp16"`` / ``"bf16"``: the tensors travel as float16 / bfloat16 (half of float32).
``"q8"``: per tensor, ``code = rint(127 * x / m) + 127`` with ``m = max |x|``
(deterministic rounding to nearest: every client gets the same model), one
byte per coordinate plus the float32 scale ``m``. Non-floating tensors (e.g.
integer buffers) and the algorithm's extras travel unchanged.

Packed form: slot ``params`` holds the tensors in the model's order (the packed
ones as float16/bfloat16/uint8 codes of the same shape); slot ``dl`` names the
packed tensors, each with its float32 scale (``q8``) or a zero (casts).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch

from fedloom.algorithms.api import Broadcast
from fedloom.core.errors import UpdateError
from fedloom.core.params import Params

__all__ = [
    "DOWNLINK_SLOT",
    "EXTRA_PREFIX",
    "Downlink",
    "broadcast_slots",
    "compress_broadcast",
    "expand_broadcast",
    "round_trip",
]

Downlink = Literal["none", "fp16", "bf16", "q8"]
DOWNLINK_SLOT = "dl"
#: Slot-name prefix of the algorithm's extras in a broadcast.
EXTRA_PREFIX = "x."
_CAST = {"fp16": torch.float16, "bf16": torch.bfloat16}
_LEVELS = 127


def compress_broadcast(b: Broadcast, mode: Downlink) -> tuple[Broadcast, Params]:
    """``(broadcast with packed params, the dl slot)``; ``mode = "none"`` returns ``b`` and an empty slot."""
    if mode == "none":
        return b, Params({})
    out: dict[str, torch.Tensor] = {}
    marks: dict[str, torch.Tensor] = {}
    for k, v in b.params.items():
        if not v.is_floating_point():
            out[k] = v
            continue
        if mode == "q8":
            m = v.detach().abs().max().to(torch.float32) if v.numel() else torch.tensor(0.0)
            safe = m if float(m) > 0 else torch.tensor(1.0)
            codes = torch.round(v.detach().to(torch.float32) * (_LEVELS / safe)) + _LEVELS
            out[k] = codes.clamp_(0, 2 * _LEVELS).to(torch.uint8)
            marks[k] = m.reshape(())
        else:
            out[k] = v.detach().to(_CAST[mode])
            marks[k] = torch.zeros((), dtype=torch.float32)
    return replace(b, params=Params(out)), Params(marks)


def broadcast_slots(b: Broadcast, mode: Downlink) -> dict[str, Params]:
    """The named tensors a broadcast travels as: ``params`` (packed under ``mode``), the ``dl`` slot
    when packed, and each extra as ``x.<name>`` (what :func:`fedloom.net.wire.encode_broadcast` encodes)."""
    packed, marks = compress_broadcast(b, mode)
    slots: dict[str, Params] = {"params": packed.params}
    if len(marks):
        slots[DOWNLINK_SLOT] = marks
    slots.update({EXTRA_PREFIX + k: v for k, v in b.extras.items()})
    return slots


def expand_broadcast(b: Broadcast, marks: Params, mode: Downlink) -> Broadcast:
    """Inverse of :func:`compress_broadcast`: the packed tensors named in ``marks`` widened to float32.

    Raises :class:`UpdateError` if a marked tensor has the wrong dtype or a scale is not finite.
    """
    if mode == "none":
        if len(marks):
            raise UpdateError(f"broadcast of round {b.round} is compressed but compression.downlink = 'none'")
        return b
    out: dict[str, torch.Tensor] = {}
    for k, v in b.params.items():
        if k not in marks:
            out[k] = v
            continue
        if mode == "q8":
            m = marks[k].to(torch.float32)
            if v.dtype != torch.uint8 or not bool(torch.isfinite(m)):
                raise UpdateError(
                    f"broadcast of round {b.round}: q8 tensor {k!r} is {v.dtype} with scale {m}"
                )
            out[k] = (v.to(torch.float32) - _LEVELS) * (m / _LEVELS)
        else:
            if v.dtype != _CAST[mode]:
                raise UpdateError(f"broadcast of round {b.round}: {mode} tensor {k!r} is {v.dtype}")
            out[k] = v.to(torch.float32)
    return replace(b, params=Params(out))


def round_trip(b: Broadcast, mode: Downlink) -> Broadcast:
    """What a client trains from when the broadcast travels as ``mode`` (the simulation's broadcast)."""
    if mode == "none":
        return b
    packed, marks = compress_broadcast(b, mode)
    return expand_broadcast(packed, marks, mode)
