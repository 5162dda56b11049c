"""Moving Python objects full of tensors between local processes through shared memory.

:func:`pack` pickles an object with every CPU tensor inside replaced by a
reference into one flat shared-memory tensor per dtype; :func:`unpack` rebuilds
it with the tensors as views of those flat tensors. Sending a :class:`Packed`
over a ``multiprocessing`` connection therefore moves a few small pickles and
one file descriptor per dtype (torch's ``file_descriptor`` sharing), however
many tensors the object holds: a worker returning 50 client deltas sends one
buffer, not 300 tensors, and the receiver copies nothing.

A sender that talks to the same receiver every round can instead place the
flat buffers in an :class:`Arena`: a shared anonymous mapping created before
``fork``, so both processes already map it and nothing is created, passed or
page-faulted per message; only ``(offset, count, dtype)`` travels. The arena is
reset by its writer at a point both sides agree on (for the parallel executor,
the start of each round), after which earlier views read new data.

This is a local inter-process format only (it relies on ``pickle`` between
processes of the same program and version); the wire format for the network is
:mod:`fedloom.core.serde`.
"""

from __future__ import annotations

import io
import mmap
import pickle
from dataclasses import dataclass
from typing import Any

import torch
import torch.multiprocessing

__all__ = ["Arena", "ArenaSlice", "Packed", "pack", "unpack"]

# Arena allocations start on a cache-line boundary.
_ALIGN = 64


@dataclass(frozen=True)
class ArenaSlice:
    """``numel`` elements of ``dtype`` at byte ``offset`` of the receiver's :class:`Arena`."""

    offset: int
    numel: int
    dtype: torch.dtype


class Arena:
    """A shared anonymous memory region with a bump allocator, mapped before ``fork``.

    Pages are only backed when first written, so a generous size costs nothing
    until it is used. :meth:`alloc` hands out aligned slices until the region is
    full (then it returns ``None`` and :func:`pack` falls back to a fresh shared
    buffer); :meth:`reset` makes the whole region free again.
    """

    def __init__(self, nbytes: int) -> None:
        if nbytes < _ALIGN:
            raise ValueError(f"an arena needs at least {_ALIGN} bytes, got {nbytes}")
        self.nbytes = nbytes
        self._mm = mmap.mmap(-1, nbytes)  # MAP_SHARED | MAP_ANONYMOUS: inherited by fork
        self._top = 0
        self._base = torch.frombuffer(self._mm, dtype=torch.uint8).data_ptr()

    def reset(self) -> None:
        """Hand out the whole region again."""
        self._top = 0

    def alloc(self, n: int, dtype: torch.dtype) -> tuple[ArenaSlice, torch.Tensor] | None:
        size = n * dtype.itemsize
        start = -(-self._top // _ALIGN) * _ALIGN
        if start + size > self.nbytes:
            return None
        self._top = start + size
        where = ArenaSlice(offset=start, numel=n, dtype=dtype)
        return where, self.view(where)

    def empty(self, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor shaped like ``like`` in the arena (fresh memory when it is full)."""
        placed = self.alloc(like.numel(), like.dtype)
        if placed is None:
            return torch.empty_like(like, memory_format=torch.contiguous_format)
        return placed[1].view(like.shape)

    def holds(self, t: torch.Tensor) -> ArenaSlice | None:
        """Where ``t`` lies in this arena, if it is a contiguous CPU tensor inside it (else ``None``)."""
        if t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
            return None
        offset = t.data_ptr() - self._base
        if offset >= 0 and offset + t.numel() * t.element_size() <= self.nbytes:
            return ArenaSlice(offset=offset, numel=t.numel(), dtype=t.dtype)
        return None

    def view(self, where: ArenaSlice) -> torch.Tensor:
        """The tensor at ``where`` (a view of the shared pages, no copy)."""
        if where.numel == 0:
            return torch.empty(0, dtype=where.dtype)
        return torch.frombuffer(self._mm, dtype=where.dtype, count=where.numel, offset=where.offset)


@dataclass(frozen=True)
class Packed:
    """A pickle whose tensors live in ``buffers``: one flat buffer per dtype, each a
    shared-memory tensor or a slice of the receiver's :class:`Arena`."""

    payload: bytes
    buffers: tuple[torch.Tensor | ArenaSlice, ...]


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


def pack(obj: Any, arena: Arena | None = None) -> Packed:
    """Pickle ``obj`` with its CPU tensors gathered into shared-memory flat buffers.

    With ``arena``, the buffers are allocated in it while it has room.
    """
    buf = io.BytesIO()
    pickler = _Pickler(buf)
    pickler.dump(obj)
    dtypes: list[torch.dtype] = []
    totals: list[int] = []
    refs: list[_Ref] = []
    buffers: list[torch.Tensor | ArenaSlice] = []
    placed_refs: dict[int, _Ref] = {}  # tensors already in the arena travel as their place there
    for i, t in enumerate(pickler.tensors):
        where = arena.holds(t) if arena is not None else None
        if where is not None:
            placed_refs[i] = (len(buffers), 0, tuple(t.shape))
            buffers.append(where)
    first_flat = len(buffers)
    for i, t in enumerate(pickler.tensors):
        if i in placed_refs:
            refs.append(placed_refs[i])
            continue
        if t.dtype not in dtypes:
            dtypes.append(t.dtype)
            totals.append(0)
        b = dtypes.index(t.dtype)
        refs.append((first_flat + b, totals[b], tuple(t.shape)))
        totals[b] += t.numel()
    flats: list[torch.Tensor] = []
    for d, n in zip(dtypes, totals, strict=True):
        placed = arena.alloc(n, d) if arena is not None else None
        if placed is None:
            flats.append(_shared_empty(n, d))
            buffers.append(flats[-1])
        else:
            buffers.append(placed[0])
            flats.append(placed[1])
    for i, (t, (b, off, _)) in enumerate(zip(pickler.tensors, refs, strict=True)):
        if i not in placed_refs:
            flats[b - first_flat][off : off + t.numel()].copy_(t.reshape(-1))
    header = pickle.dumps(refs, protocol=pickle.HIGHEST_PROTOCOL)
    return Packed(payload=len(header).to_bytes(8, "little") + header + buf.getvalue(), buffers=tuple(buffers))


def unpack(packed: Packed, arena: Arena | None = None) -> Any:
    """Rebuild the object packed by :func:`pack`; its tensors are views of its buffers.

    ``arena`` is the receiver's mapping of the sender's arena (needed when the
    sender allocated in one).
    """
    size = int.from_bytes(packed.payload[:8], "little")
    refs: list[_Ref] = pickle.loads(packed.payload[8 : 8 + size])
    flats = [_resolve(b, arena) for b in packed.buffers]
    tensors = [flats[b][off : off + _numel(shape)].view(shape) for b, off, shape in refs]
    return _Unpickler(io.BytesIO(packed.payload[8 + size :]), tensors).load()


def _resolve(buffer: torch.Tensor | ArenaSlice, arena: Arena | None) -> torch.Tensor:
    if isinstance(buffer, torch.Tensor):
        return buffer
    if arena is None:
        raise ValueError("this message was packed into an arena; pass the receiver's arena to unpack")
    return arena.view(buffer)


def _shared_empty(n: int, dtype: torch.dtype) -> torch.Tensor:
    # Allocated in shared memory directly (``empty().share_memory_()`` would allocate and copy twice).
    if n == 0:
        return torch.empty(0, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(n * dtype.itemsize)  # type: ignore[no-untyped-call]
    return torch.empty(0, dtype=dtype).set_(storage)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
