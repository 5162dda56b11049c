"""Binary encoding of parameters and server state (safetensors; never pickle).

``params_to_bytes``/``params_from_bytes`` and ``state_to_bytes``/``state_from_bytes``
are symmetric pairs; a round trip returns bit-identical tensors in the same order.
safetensors stores raw little-endian buffers behind a small JSON header.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedloom.core.errors import RunStateError
from fedloom.core.params import Params

__all__ = ["params_from_bytes", "params_to_bytes", "slots_from_bytes", "slots_to_bytes"]

_ORDER_KEY = "fedloom.order"


def params_to_bytes(params: Params) -> bytes:
    """Encode parameters; key order is kept in the header metadata."""
    tensors = {k: v.contiguous() for k, v in params.items()}
    return bytes(st_save(tensors, metadata={_ORDER_KEY: json.dumps(list(params))}))


def params_from_bytes(blob: bytes) -> Params:
    """Decode :func:`params_to_bytes` output, restoring the original key order."""
    return slots_from_bytes(blob)[""]


def slots_to_bytes(slots: Mapping[str, Params]) -> bytes:
    """Encode several named ``Params`` (e.g. optimiser slots) into one blob.

    Tensor keys become ``"<slot>/<name>"``; the slot and key order are kept.
    """
    tensors: dict[str, torch.Tensor] = {}
    order: dict[str, list[str]] = {}
    for slot, params in slots.items():
        if "/" in slot:
            raise ValueError(f"slot name {slot!r} must not contain '/'")
        order[slot] = list(params)
        for k, v in params.items():
            tensors[f"{slot}/{k}"] = v.contiguous()
    return bytes(st_save(tensors, metadata={_ORDER_KEY: json.dumps(order)}))


def slots_from_bytes(blob: bytes) -> dict[str, Params]:
    """Decode :func:`slots_to_bytes` (or :func:`params_to_bytes`, as slot ``""``)."""
    try:
        header_len = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8 : 8 + header_len])
        order = json.loads(header.get("__metadata__", {})[_ORDER_KEY])
        tensors = st_load(blob)
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise RunStateError(f"cannot decode a parameter blob ({len(blob)} bytes): {exc}") from exc
    if isinstance(order, list):
        return {"": Params({k: tensors[k] for k in order})}
    return {slot: Params({k: tensors[f"{slot}/{k}"] for k in keys}) for slot, keys in order.items()}
