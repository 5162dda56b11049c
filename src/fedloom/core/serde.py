"""Binary encoding of parameters and server state (safetensors; never pickle).

``params_to_bytes``/``params_from_bytes`` and ``state_to_bytes``/``state_from_bytes``
are symmetric pairs; a round trip returns bit-identical tensors in the same order.
safetensors stores raw little-endian buffers behind a small JSON header.

Writing is done here rather than by ``safetensors.torch.save``: the format is an
8-byte header length, the JSON header (tensor name -> dtype, shape, byte range,
plus ``__metadata__``), space padding to 8 bytes, then the raw buffers. Building
it from views of the tensors and joining once copies each byte once; the
library's writer copies every tensor twice and spends most of its time in Python
checks for shared storage (a deployed client encodes a model-sized update every
round). Reading stays with ``safetensors.torch.load``, which validates the header
and byte ranges; tests/core/test_serde.py checks that it reads our
output bit-exactly and that we read the library's.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedloom.core.errors import RunStateError
from fedloom.core.params import Params

__all__ = ["params_from_bytes", "params_to_bytes", "slots_from_bytes", "slots_to_bytes"]

_ORDER_KEY = "fedloom.order"


_DTYPE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _safetensors(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors encoding of ``tensors`` (see the module docstring), each byte copied once."""
    if sys.byteorder != "little" or any(
        v.dtype not in _DTYPE_CODES or v.device.type != "cpu" for v in tensors.values()
    ):
        return bytes(st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))
    # Widest elements first, as the library lays them out: every buffer starts aligned to its type.
    names = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, object] = {"__metadata__": metadata}
    views: list[memoryview] = []
    offset = 0
    for k in names:
        v = tensors[k].detach().contiguous()
        raw = memoryview(v.reshape(-1).view(torch.uint8).numpy().data)
        header[k] = {
            "dtype": _DTYPE_CODES[v.dtype],
            "shape": list(v.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        views.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return b"".join([len(text).to_bytes(8, "little"), text, *views])


def params_to_bytes(params: Params) -> bytes:
    """Encode parameters; key order is kept in the header metadata."""
    return _safetensors(dict(params.items()), {_ORDER_KEY: json.dumps(list(params))})


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
            tensors[f"{slot}/{k}"] = v
    return _safetensors(tensors, {_ORDER_KEY: json.dumps(order)})


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
