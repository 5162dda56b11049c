"""The packed form of a compressed update, and the helpers every codec shares.

A codec's client side replaces the update's ``delta`` with an empty
:class:`~fedloom.core.params.Params` and puts its encoding in
``extras["codec"]``: a few flat tensors (packed integer codes, scales,
indices, values) plus ``"meta"``, an ``int64`` tensor
``[codec id, bits, block, elements, kept]`` that the server compares with its
own configuration. The deployment's wire (:mod:`fedloom.net.wire`) already
sends extras as raw little-endian buffers, so these bytes are what travels;
the simulation carries the same tensors, so both runtimes decode the same
thing. The server's decode rebuilds ``delta`` from them and drops the extra.

Every check of a received encoding raises :class:`~fedloom.core.errors.UpdateError`
naming the client and the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace

import torch

from fedloom.algorithms.api import ClientState, ClientUpdate
from fedloom.algorithms.local import TRANSFORM_STATE_PREFIX
from fedloom.core.errors import UpdateError
from fedloom.core.params import Params

__all__ = [
    "CODEC_SLOT",
    "RESIDUAL_KEY",
    "check_meta",
    "field",
    "flatten",
    "pack_codes",
    "packed_update",
    "payload_bytes",
    "refuse_non_finite",
    "residual_of",
    "unflatten",
    "unpack_codes",
    "unpacked_update",
    "with_residual",
]

CODEC_SLOT = "codec"
# Every runtime hands ``transform.*`` client-state entries past the algorithm and back to the
# pipeline's client side (fedloom.algorithms.local.client_update_with_state).
RESIDUAL_KEY = TRANSFORM_STATE_PREFIX + "ef_residual"

_META_FIELDS = ("codec", "bits", "block", "elements", "kept")


def refuse_non_finite(update: ClientUpdate, what: str) -> None:
    """Raise :class:`UpdateError` if the delta holds NaN or infinity (before anything is encoded)."""
    for k, v in update.delta.items():
        if not bool(torch.isfinite(v).all()):
            raise UpdateError(
                f"client {update.client_id}: {what} refuses to encode parameter {k!r}: it holds "
                f"{int((~torch.isfinite(v)).sum())} NaN or infinite values"
            )


def flatten(params: Params) -> torch.Tensor:
    """All tensors of ``params`` as one float32 vector, in key order (``[elements]``)."""
    if len(params) == 0:
        return torch.zeros(0, dtype=torch.float32)
    return torch.cat([v.detach().reshape(-1).to(torch.float32) for v in params.values()])


def unflatten(flat: torch.Tensor, template: Params) -> Params:
    """Cut ``flat`` back into ``template``'s names, shapes and dtypes."""
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for k, v in template.items():
        n = v.numel()
        out[k] = flat[offset : offset + n].reshape(v.shape).to(v.dtype)
        offset += n
    return Params(out)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit codes (``uint8``, each ``< 2^bits``) into bytes, low bits first.

    ``bits`` is 2, 4 or 8; the result has ``ceil(len(codes) * bits / 8)`` bytes.
    """
    if bits == 8:
        return codes.to(torch.uint8)
    per = 8 // bits
    n = codes.numel()
    padded = torch.zeros(math.ceil(n / per) * per, dtype=torch.uint8)
    padded[:n] = codes
    lanes = padded.reshape(-1, per)  # [bytes, per]
    out = torch.zeros(lanes.shape[0], dtype=torch.uint8)
    for j in range(per):
        out |= lanes[:, j] << (j * bits)
    return out


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``n`` codes (``uint8``) from ``packed``."""
    if bits == 8:
        return packed[:n]
    per = 8 // bits
    mask = (1 << bits) - 1
    lanes = torch.stack([(packed >> (j * bits)) & mask for j in range(per)], dim=1)  # [bytes, per]
    return lanes.reshape(-1)[:n]


def packed_update(
    update: ClientUpdate, tensors: Mapping[str, torch.Tensor], meta: tuple[int, ...]
) -> ClientUpdate:
    """``update`` with its delta replaced by the packed ``tensors`` and ``meta`` in ``extras["codec"]``."""
    slot = Params({**tensors, "meta": torch.tensor(meta, dtype=torch.int64)})
    return replace(update, delta=Params({}), extras={**update.extras, CODEC_SLOT: slot})


def field(update: ClientUpdate, name: str, dtype: torch.dtype, length: int, codec: str) -> torch.Tensor:
    """The packed tensor ``name`` of ``update``, checked to be 1-D ``dtype`` of ``length`` elements."""
    slot = update.extras.get(CODEC_SLOT)
    who = f"client {update.client_id}: {codec} payload"
    if slot is None or name not in slot:
        raise UpdateError(f"{who} has no field {name!r}")
    v = slot[name]
    if v.dtype != dtype or v.dim() != 1 or v.numel() != length:
        raise UpdateError(
            f"{who} field {name!r} is {v.dtype} of shape {tuple(v.shape)}, expected {dtype} of shape ({length},)"
        )
    return v


def check_meta(update: ClientUpdate, codec: str, expected: tuple[int, ...]) -> None:
    """Refuse an update that is not packed, has unknown fields, or whose meta differs from ``expected``."""
    who = f"client {update.client_id}: {codec} payload"
    if len(update.delta) != 0:
        raise UpdateError(
            f"{who}: the update carries a plain delta; this server expects {codec}-packed updates"
        )
    slot = update.extras.get(CODEC_SLOT)
    if slot is None:
        raise UpdateError(f"{who}: the update has no {CODEC_SLOT!r} extra")
    meta = field(update, "meta", torch.int64, len(expected), codec).tolist()
    for name, got, want in zip(_META_FIELDS, meta, expected, strict=False):
        if got != want:
            raise UpdateError(f"{who} field {name!r} = {got}, expected {want}")


def unpacked_update(update: ClientUpdate, delta: Params) -> ClientUpdate:
    """``update`` with ``delta`` restored and the codec extra dropped."""
    extras = {k: v for k, v in update.extras.items() if k != CODEC_SLOT}
    return replace(update, delta=delta, extras=extras)


def payload_bytes(update: ClientUpdate) -> int:
    """Bytes of tensor data the update puts on the wire (delta and extras; headers not counted)."""
    return update.delta.num_bytes() + sum(p.num_bytes() for p in update.extras.values())


def with_residual(update: ClientUpdate, residual: Params) -> ClientUpdate:
    """``update`` whose client state holds ``residual`` under :data:`RESIDUAL_KEY` (other keys kept)."""
    values = dict(update.client_state.values) if update.client_state is not None else {}
    values[RESIDUAL_KEY] = residual
    return replace(update, client_state=ClientState(values=values))


def residual_of(update: ClientUpdate) -> Params | None:
    """The error-feedback residual the client kept from its previous round, if any."""
    if update.client_state is None:
        return None
    return update.client_state.values.get(RESIDUAL_KEY)
