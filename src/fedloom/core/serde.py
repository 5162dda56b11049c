"""Binary encoding of parameters and server state (safetensors; never pickle).

``params_to_bytes``/``params_from_bytes`` and ``state_to_bytes``/``state_from_bytes``
are symmetric pairs; a round trip returns bit-identical tensors in the same order.
safetensors stores raw little-endian buffers behind a small JSON header.

Writing and reading are done here rather than by ``safetensors.torch.save``/``load``:
the format is an 8-byte header length, the JSON header (tensor name -> dtype, shape,
byte range, plus ``__metadata__``), space padding to 8 bytes, then the raw buffers.
Building it from views of the tensors and joining once copies each byte once; the
library's writer copies every tensor twice and spends most of its time in Python
checks for shared storage (a deployed client encodes a model-sized update every
round). The reader checks the header as the library does (known dtype, shape and
byte range agreeing, ranges that tile the data area with no hole or overlap) and
copies each tensor's bytes once, into a writable buffer of its own; the
library's reader needs ``bytes`` (a received message's payload would first be
sliced out, one copy) and copies each tensor again. It reads from a
``memoryview``, so a payload inside a larger message is never sliced. A dtype
outside the table (complex, say) or a big-endian machine goes through the
library. tests/core/test_serde.py checks both directions against the library,
bit-exactly, and that malformed headers are refused.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedloom.core.errors import RunStateError
from fedloom.core.params import Params

__all__ = [
    "data_all_finite",
    "data_square_sum",
    "params_from_bytes",
    "params_to_bytes",
    "slots_from_bytes",
    "slots_to_bytes",
    "slots_to_pieces",
]

Blob = bytes | bytearray | memoryview

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
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}


def _safetensors(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> list[bytes | memoryview]:
    """The safetensors encoding of ``tensors`` (see the module docstring) as pieces to join once.

    The pieces after the header are views of the tensors' memory (of contiguous copies, for
    non-contiguous tensors): valid as long as the tensors are not modified.
    """
    if sys.byteorder != "little" or any(
        v.dtype not in _DTYPE_CODES or v.device.type != "cpu" for v in tensors.values()
    ):
        return [bytes(st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))]
    # Widest elements first, as the library lays them out: every buffer starts aligned to its type.
    names = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, object] = {"__metadata__": metadata}
    views: list[memoryview] = []
    offset = 0
    for k in names:
        v = tensors[k].detach().contiguous()
        raw = _bytes_view(v)
        header[k] = {
            "dtype": _DTYPE_CODES[v.dtype],
            "shape": list(v.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        views.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return [len(text).to_bytes(8, "little"), text, *views]


# dtypes whose tensors NumPy can view directly (a third of the Python calls of the byte-view route)
_NUMPY_DTYPES = frozenset(
    {
        torch.float64,
        torch.float32,
        torch.float16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
    }
)


def _bytes_view(v: torch.Tensor) -> memoryview:
    """The raw bytes of the contiguous CPU tensor ``v``, as a flat view (no copy)."""
    if v.dtype in _NUMPY_DTYPES and v.dim() > 0 and v.numel() > 0:
        return memoryview(v.numpy().data).cast("B")
    return memoryview(v.reshape(-1).view(torch.uint8).numpy().data)


def params_to_bytes(params: Params) -> bytes:
    """Encode parameters; key order is kept in the header metadata."""
    return b"".join(_safetensors(dict(params.items()), {_ORDER_KEY: json.dumps(list(params))}))


class _Foreign(Exception):
    """The blob holds a dtype outside :data:`_DTYPE_CODES`: the library reads it."""


@dataclass(frozen=True)
class _Layout:
    """A checked safetensors header: where each tensor lies, by data offset (see :func:`_layout`)."""

    entries: tuple[tuple[int, int, str, torch.dtype, tuple[int, ...]], ...]
    metadata: dict[str, str]
    start: int  # where the data area begins in the blob
    order: object  # json.loads of the ``fedloom.order`` metadata (None: absent or not JSON)


def _layout(view: memoryview) -> _Layout:
    """The checked header of the safetensors blob ``view`` (cast to bytes).

    Raises ``ValueError`` naming what is malformed, :class:`_Foreign` for a dtype outside the table.
    """
    if len(view) < 8:
        raise ValueError(f"{len(view)} bytes is shorter than the 8-byte header length")
    n = int.from_bytes(view[:8], "little")
    if n > len(view) - 8:
        raise ValueError(f"header length {n} overruns the {len(view)}-byte blob")
    return _parse_layout(bytes(view[8 : 8 + n]), len(view))


# Cached by (header bytes, blob length). A deployed server decodes one update per client per round
# and a client one broadcast per round, all with the same header: parsing and checking it again
# cost about a third of a 2NN decode. The check is a pure function of its arguments, so a hit is
# exactly what a fresh parse gives (a header that fails is not cached: it raises each time).
@functools.lru_cache(maxsize=64)
def _parse_layout(text: bytes, size: int) -> _Layout:
    header = json.loads(text)
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ValueError("__metadata__ must map strings to strings")
    start = 8 + len(text)
    entries: list[tuple[int, int, str, torch.dtype, tuple[int, ...]]] = []
    for name, e in header.items():
        if not isinstance(e, dict):
            raise ValueError(f"tensor {name!r}: the entry is not an object")
        code, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if code not in _CODE_DTYPES:
            if isinstance(code, str):
                raise _Foreign(code)
            raise ValueError(f"tensor {name!r}: dtype {code!r} is not a type name")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"tensor {name!r}: shape {shape!r} is not a list of sizes")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise ValueError(f"tensor {name!r}: data_offsets {offsets!r} is not a byte range")
        dtype = _CODE_DTYPES[code]
        need = math.prod(shape) * dtype.itemsize
        if offsets[1] - offsets[0] != need:
            raise ValueError(
                f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for shape {shape} {code} ({need} bytes)"
            )
        entries.append((offsets[0], offsets[1], name, dtype, tuple(shape)))
    entries.sort(key=lambda t: (t[0], t[1]))
    end = 0
    for begin, stop, name, _, _ in entries:
        if begin != end:
            raise ValueError(
                f"tensor {name!r} starts at byte {begin}: ranges overlap or leave a hole at {end}"
            )
        end = stop
    if end != size - start:
        raise ValueError(f"the data area holds {size - start} bytes, the tensors {end}")
    try:
        order = json.loads(metadata[_ORDER_KEY]) if _ORDER_KEY in metadata else None
    except ValueError:
        order = None
    return _Layout(tuple(entries), metadata, start, order)


def _read_safetensors(blob: Blob, *, copy: bool = True) -> tuple[dict[str, torch.Tensor], _Layout]:
    """Tensors and layout of a safetensors blob, each tensor byte copied once (module docstring).

    With ``copy=False`` the tensors are views of ``blob`` itself (which must be writable and
    outlive them). Raises ``ValueError`` naming what is malformed, :class:`_Foreign` for a dtype
    outside the table.
    """
    view = memoryview(blob).cast("B")
    layout = _layout(view)
    start = layout.start
    tensors: dict[str, torch.Tensor] = {}
    for begin, stop, name, dtype, shape in layout.entries:
        if begin == stop:
            tensors[name] = torch.empty(shape, dtype=dtype)
        elif copy:  # the one copy, into an (aligned) buffer of the tensor's own: storages are never shared
            own = bytearray(view[start + begin : start + stop])
            tensors[name] = torch.frombuffer(own, dtype=dtype).reshape(shape)
        else:
            n = (stop - begin) // dtype.itemsize
            tensors[name] = torch.frombuffer(view, dtype=dtype, count=n, offset=start + begin).reshape(shape)
    return tensors, layout


def data_all_finite(blob: Blob) -> bool | None:
    """Whether every element of the safetensors blob ``blob`` is finite, in one pass over its data
    area when all its tensors share one floating dtype NumPy reads (``None``: they do not; check the
    tensors one by one). A deployed server checks every incoming update: one pass over the 2NN's
    0.8 MB instead of one per tensor halves the check (40 to 19 us on an idle core).
    """
    view = memoryview(blob).cast("B")
    try:
        layout = _layout(view)
    except (ValueError, RecursionError, _Foreign):
        return None
    dtypes = {e[3] for e in layout.entries}
    if len(dtypes) != 1:
        return None
    dtype = dtypes.pop()
    if dtype not in _NUMPY_FINITE:
        return None if dtype.is_floating_point else True
    data = np.frombuffer(view, dtype=_NUMPY_FINITE[dtype], offset=layout.start)
    return bool(np.isfinite(data).all())


_NUMPY_FINITE = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16}


def data_square_sum(blob: Blob) -> float | None:
    """The sum of the squares of every element of the safetensors blob ``blob``, in one BLAS dot over
    its data area when all its tensors are float32 (accumulated in float32: it is ``inf`` once it
    passes float32's largest value) or all float64; ``None`` otherwise (sum the tensors one by one).
    """
    view = memoryview(blob).cast("B")
    try:
        layout = _layout(view)
    except (ValueError, RecursionError, _Foreign):
        return None
    dtypes = {e[3] for e in layout.entries}
    if len(dtypes) != 1 or (dtype := dtypes.pop()) not in (torch.float32, torch.float64):
        return None
    data = np.frombuffer(view, dtype=_NUMPY_FINITE[dtype], offset=layout.start)
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.dot(data, data))


def params_from_bytes(blob: bytes) -> Params:
    """Decode :func:`params_to_bytes` output, restoring the original key order."""
    return slots_from_bytes(blob)[""]


def slots_to_bytes(slots: Mapping[str, Params]) -> bytes:
    """Encode several named ``Params`` (e.g. optimiser slots) into one blob.

    Tensor keys become ``"<slot>/<name>"``; the slot and key order are kept.
    """
    return b"".join(slots_to_pieces(slots))


def slots_to_pieces(slots: Mapping[str, Params]) -> list[bytes | memoryview]:
    """:func:`slots_to_bytes` before its one join: to join with other bytes (a message header) at once.

    The pieces view the tensors: join them before the tensors change.
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


def slots_from_bytes(blob: Blob, *, copy: bool = True) -> dict[str, Params]:
    """Decode :func:`slots_to_bytes` (or :func:`params_to_bytes`, as slot ``""``); ``blob`` may be a view.

    ``copy=False`` makes the tensors views of ``blob`` (writable, kept alive and unchanged while
    they are used) instead of copies.
    """
    order: object = None
    try:
        if sys.byteorder != "little":
            raise _Foreign("big-endian machine")
        tensors, layout = _read_safetensors(blob, copy=copy)
        metadata, order = layout.metadata, layout.order
    except _Foreign:
        try:
            tensors, metadata = st_load(bytes(blob)), _metadata(blob)
        except Exception as exc:  # safetensors raises its own error type on a corrupt buffer
            raise RunStateError(f"cannot decode a parameter blob ({len(blob)} bytes): {exc}") from exc
    except (ValueError, TypeError, RecursionError) as exc:  # RecursionError: a header nested too deep
        raise RunStateError(f"cannot decode a parameter blob ({len(blob)} bytes): {exc}") from exc
    try:
        if order is None:
            order = json.loads(metadata[_ORDER_KEY])
        if isinstance(order, list):
            return {"": Params({k: tensors[k] for k in order})}
        if not isinstance(order, dict):
            raise TypeError(f"expected a list or an object, got {type(order).__name__}")
        return {slot: Params({k: tensors[f"{slot}/{k}"] for k in keys}) for slot, keys in order.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RunStateError(
            f"cannot decode a parameter blob ({len(blob)} bytes): bad {_ORDER_KEY}: {exc}"
        ) from exc


def _metadata(blob: Blob) -> dict[str, str]:
    view = memoryview(blob).cast("B")
    n = int.from_bytes(view[:8], "little")
    meta: dict[str, str] = json.loads(bytes(view[8 : 8 + n])).get("__metadata__", {})
    return meta
