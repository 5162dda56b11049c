"""Moving Python objects full of tensors between local processes through shared memory.

:func:`pack` pickles an object with every CPU tensor inside replaced by a
reference into one flat shared-memory tensor per dtype; :func:`unpack` rebuilds
it with the tensors as views of those flat tensors. Sending a :class:`Packed`
over a ``multiprocessing`` connection therefore moves a few small pickles and
one file descriptor per dtype (torch's ``file_descriptor`` sharing), however
many tensors the object holds: a worker returning 50 client deltas sends one
buffer, not 300 tensors, and the receiver copies nothing.

This is a local inter-process format only (it relies on ``pickle`` between
processes of the same program and version); the wire format for the network is
:mod:`fedloom.core.serde`.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from typing import Any

import torch
import torch.multiprocessing

__all__ = ["Packed", "pack", "unpack"]


@dataclass(frozen=True)
class Packed:
    """A pickle whose tensors live in ``buffers`` (flat, shared memory, one per dtype)."""

    payload: bytes
    buffers: tuple[torch.Tensor, ...]


# A tensor reference in the payload: (buffer index, offset, shape).
_Ref = tuple[int, int, tuple[int, ...]]


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors: list[torch.Tensor] = []
        self.seen: dict[int, int] = {}

    def persistent_id(self, obj: Any) -> int | None:
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.requires_grad:
            key = id(obj)
            if key not in self.seen:
                self.seen[key] = len(self.tensors)
                self.tensors.append(obj)
            return self.seen[key]
        return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, tensors: list[torch.Tensor]) -> None:
        super().__init__(file)
        self.tensors = tensors

    def persistent_load(self, pid: Any) -> torch.Tensor:
        return self.tensors[int(pid)]


def pack(obj: Any) -> Packed:
    """Pickle ``obj`` with its CPU tensors gathered into shared-memory flat buffers."""
    buf = io.BytesIO()
    pickler = _Pickler(buf)
    pickler.dump(obj)
    dtypes: list[torch.dtype] = []
    totals: list[int] = []
    refs: list[_Ref] = []
    for t in pickler.tensors:
        if t.dtype not in dtypes:
            dtypes.append(t.dtype)
            totals.append(0)
        b = dtypes.index(t.dtype)
        refs.append((b, totals[b], tuple(t.shape)))
        totals[b] += t.numel()
    flats = [_shared_empty(n, d) for d, n in zip(dtypes, totals, strict=True)]
    for t, (b, off, _) in zip(pickler.tensors, refs, strict=True):
        flats[b][off : off + t.numel()].copy_(t.reshape(-1))
    header = pickle.dumps(refs, protocol=pickle.HIGHEST_PROTOCOL)
    return Packed(payload=len(header).to_bytes(8, "little") + header + buf.getvalue(), buffers=tuple(flats))


def unpack(packed: Packed) -> Any:
    """Rebuild the object packed by :func:`pack`; its tensors are views of ``packed.buffers``."""
    size = int.from_bytes(packed.payload[:8], "little")
    refs: list[_Ref] = pickle.loads(packed.payload[8 : 8 + size])
    tensors = [packed.buffers[b][off : off + _numel(shape)].view(shape) for b, off, shape in refs]
    return _Unpickler(io.BytesIO(packed.payload[8 + size :]), tensors).load()


def _shared_empty(n: int, dtype: torch.dtype) -> torch.Tensor:
    t = torch.empty(n, dtype=dtype)
    t.share_memory_()  # type: ignore[no-untyped-call]
    return t


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
