"""Summing a round's updates where they are, bit-identical to aggregating them in one place.

FedAvg's weighted mean (:func:`~fedloom.algorithms.aggregate.weighted_mean`) is
one left-to-right chain per tensor over the accepted updates in cohort order,
``sum_i w_i * delta_i`` with each update's raw weight ``w_i``
(:meth:`~fedloom.core.params.Params.accumulate`), divided by the total weight
``W`` once at the end. No coefficient depends on ``W``, so an executor can run
that chain while the round is still training, and hand the runner the finished
``Aggregate`` instead of every delta:

* the parallel executor's workers extend the chain themselves through a shared
  :class:`Ledger`: whoever completes the chain's next position adds it, and
  updates that finish early wait in shared memory for it, so the sum is done
  while the round trains, next to the update in the cache of the core that
  wrote it, and no delta travels to the main process;
* the Ray executor's actors train *contiguous* runs of the cohort and cut the
  chain between them: actor 1 starts it over its updates, actor 2 continues it
  from actor 1's partial sum, and only the last partial sum -- one model's worth
  of bytes -- reaches the driver.

Either way the result is the ``Aggregate`` that ``FedAvg.aggregate`` would have
returned, bit for bit.

This applies when the round's aggregation is exactly that weighted mean on the
updates as the clients produced them. The algorithm declares it: a method
``why_not_weighted_mean() -> str | None`` returning ``None`` promises that
``aggregate(updates)`` is :func:`weighted_mean` of the accepted updates (dropped
stragglers removed, cohort order) by each update's own ``weight`` -- whatever
weighting set that weight on the client side (example counts, or 1 for
``server.weighting = "uniform"``), since the reduction reads the same weights --
and an empty aggregate when every update was dropped. FedAvg and FedProx declare
it while their aggregator is :func:`weighted_mean`; an algorithm without the
method aggregates with its own rule. The round must also have no update
transforms (their ``decode`` runs per update on the server), no simulated attack
and no secure aggregation. :func:`not_reducible` says why a round cannot be
reduced; such rounds return every update.
"""

from __future__ import annotations

import ctypes
import math
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from multiprocessing.sharedctypes import RawArray
from typing import Any

import torch

from fedloom.algorithms.api import Aggregate, Algorithm, ClientUpdate
from fedloom.algorithms.stragglers import accepted
from fedloom.core.errors import UpdateError
from fedloom.core.params import Params
from fedloom.sim.transport import _ALIGN, Arena, ArenaSlice
from fedloom.transforms.pipeline import Pipeline

__all__ = ["Ledger", "contiguous_shares", "finished", "not_reducible", "slot_size", "summary", "weights"]

# How long a process with an update it cannot park sleeps between looks at the chain.
WAIT_S = 0.0002


def not_reducible(algorithm: Algorithm, pipeline: Pipeline) -> str | None:
    """Why this round's aggregation cannot be reduced on workers (``None``: it can)."""
    declared = getattr(algorithm, "why_not_weighted_mean", None)
    if not callable(declared):
        return f"{type(algorithm).__name__} aggregates with its own rule"
    reason = declared()
    if reason is not None:
        return str(reason)
    if pipeline.stages:
        return "update transforms decode each update on the server"
    return None


def summary(update: ClientUpdate) -> ClientUpdate:
    """``update`` without its delta (what a reducing worker sends back: counts, metrics, state)."""
    return ClientUpdate(
        client_id=update.client_id,
        delta=Params({}),
        weight=update.weight,
        num_examples=update.num_examples,
        num_steps=update.num_steps,
        metrics=update.metrics,
        extras={},
        client_state=update.client_state,
    )


def weights(updates: Sequence[ClientUpdate]) -> tuple[dict[int, float], float]:
    """``({client: w_i}, W)`` over the accepted updates, as :func:`weighted_mean` reads them."""
    kept = accepted(updates)
    if not kept:
        return {}, 0.0
    return {u.client_id: u.weight for u in kept}, _total([u.weight for u in kept])


def _total(ws: Sequence[float]) -> float:
    total = float(sum(ws))
    if not total > 0:
        raise UpdateError(f"total aggregation weight is {total}; every update must have a positive weight")
    return total


def finished(delta: Params | None, zeros: Params, num_clients: int, total: float) -> Aggregate:
    """The round's ``Aggregate`` from the chained sum ``sum_i w_i * delta_i`` (``None``: every
    update was a dropped straggler), divided by ``total``."""
    if delta is None:
        return Aggregate(delta=zeros, num_clients=0, total_weight=0.0)
    return Aggregate(delta=delta / total, num_clients=num_clients, total_weight=total)


class Ledger:
    """A round's weighted sum, extended in cohort order by whichever process completes the next position.

    The parallel executor's workers share one ledger (created before the fork): shared
    memory for the sum and for parked updates, and a few shared counters guarded by
    ``lock``. A worker that completes cohort position ``i``:

    * when ``i`` is the next position of the chain, adds its update itself (an update the
      chain must skip -- a failure, a dropped straggler -- adds nothing) and goes on with
      every later position already parked, in order, until it reaches one still training;
    * otherwise parks the update: it lies in a slot of the ledger's memory (trained there,
      or copied there) and the ledger records its position, slot and weight; whoever adds
      the position before it later adds it. With no slot to park in, it waits until the
      chain reaches ``i``: the process that holds the chain's next position is never waiting
      (it adds its own update), so the chain always moves on.

    Each tensor is therefore one left-to-right chain over the accepted updates in cohort
    order -- ``w0 * x0``, then ``add_(x, alpha=w)``, as :meth:`Params.accumulate` -- whatever
    order the clients finish in and whichever process adds them, and the sum is done while
    the round is still training, next to the update in the cache of the core that wrote it.
    Slots are taken lowest first, so the memory the ledger touches is the few updates
    parked at once, not the cohort.

    ``slot_bytes`` must hold one update (:func:`slot_size`); the region has ``slots`` slots
    for parked updates plus one for the sum. The table of parked positions is a ring of
    ``table`` entries: a position is parked only within ``table`` of the chain's next.
    """

    NEXT, ADDED = 0, 1

    def __init__(self, slots: int, slot_bytes: int, table: int, lock: AbstractContextManager[Any]) -> None:
        if slots < 0 or table < 1:
            raise ValueError(f"a ledger needs slots >= 0 and table >= 1, got {slots} and {table}")
        while True:
            try:
                self.region = Arena(max(slot_bytes * (slots + 1), 1 << 12))
                break
            except OSError:  # the OS refuses the mapping (strict overcommit): fewer slots
                if slots == 0:
                    raise
                slots //= 2
        self.slots, self.slot_bytes, self.table, self.lock = slots, slot_bytes, table, lock
        self._counters = RawArray(ctypes.c_int64, 2)
        self._busy = RawArray(ctypes.c_int8, max(self.slots, 1))
        self._pos = RawArray(ctypes.c_int64, table)
        self._slot = RawArray(ctypes.c_int64, table)
        self._weight = RawArray(ctypes.c_double, table)
        self._views: dict[tuple[int, _Layout], list[torch.Tensor]] = {}

    # ---- the main process, between rounds -----------------------------------
    def begin(self) -> None:
        """Start a round's chain (caller holds ``lock``; no process is inside the round)."""
        ctypes.memset(self._counters, 0, ctypes.sizeof(self._counters))
        ctypes.memset(self._busy, 0, ctypes.sizeof(self._busy))
        ctypes.memset(self._pos, 0xFF, ctypes.sizeof(self._pos))  # -1: no position parked there

    def result(
        self, outcomes: Sequence[object], like: Sequence[torch.Tensor], names: Sequence[str]
    ) -> Aggregate:
        """The round's ``Aggregate`` once every position was settled (``like``: the broadcast,
        ``names`` its keys, in the order of the updates' tensors)."""
        kept = accepted([o for o in outcomes if isinstance(o, ClientUpdate)])
        if self._counters[self.NEXT] != len(outcomes) or self._counters[self.ADDED] != len(kept):
            raise RuntimeError(
                f"the ledger passed {self._counters[self.NEXT]} of {len(outcomes)} cohort positions "
                f"and added {self._counters[self.ADDED]} of {len(kept)} accepted updates"
            )
        zeros = Params({k: torch.zeros_like(t) for k, t in zip(names, like, strict=True)})
        if not kept:
            return finished(None, zeros, 0, 0.0)
        acc = Params(dict(zip(names, self.sum_views(like), strict=True)))
        return finished(acc, zeros, len(kept), _total([u.weight for u in kept]))

    # ---- a process that trains ---------------------------------------------
    def take(self) -> int:
        """A free slot to train the next update into, or -1 (caller holds ``lock``)."""
        for s in range(self.slots):
            if not self._busy[s]:
                self._busy[s] = 1
                return s
        return -1

    def views(self, slot: int, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Tensors shaped like ``like`` laid out in ``slot`` (see :meth:`sum_views` for the sum)."""
        return self._laid_out(slot, _layout(like))

    def sum_views(self, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The sum's tensors: shaped like ``like``, in the dtype ``w * x`` has (an integer entry's sum
        is a float, as in :meth:`Params.accumulate`)."""
        return self._laid_out(self.slots, _summed(like))

    def _laid_out(self, slot: int, layout: _Layout) -> list[torch.Tensor]:
        key = (slot, layout)
        got = self._views.get(key)
        if got is None:
            got, offset = [], slot * self.slot_bytes
            for shape, dtype in layout:
                offset = -(-offset // _ALIGN) * _ALIGN
                numel = math.prod(shape)
                got.append(self.region.view(ArenaSlice(offset, numel, dtype)).view(shape))
                offset += numel * dtype.itemsize
            if offset > (slot + 1) * self.slot_bytes:
                raise ValueError(f"an update of {offset - slot * self.slot_bytes} bytes does not fit a slot")
            self._views[key] = got
        return got

    def settle(
        self, position: int, slot: int, outcome: object, like: Sequence[torch.Tensor], names: Sequence[str]
    ) -> None:
        """Add ``outcome`` (of ``position``, trained into ``slot`` or -1) to the chain, or park it."""
        update = outcome if isinstance(outcome, ClientUpdate) and accepted([outcome]) else None
        tensors: list[torch.Tensor] | None = None
        weight = 0.0
        if update is not None:
            if list(update.delta) != list(names):
                raise UpdateError(
                    f"client {update.client_id}'s update has entries {list(update.delta)}, "
                    f"not the model's {list(names)}: it cannot join the round's sum"
                )
            tensors, weight = [update.delta[k] for k in names], update.weight
            for k, t, m in zip(names, tensors, like, strict=True):
                if t.shape != m.shape or t.dtype != m.dtype:
                    raise UpdateError(
                        f"client {update.client_id}'s update entry {k!r} is {t.dtype} {tuple(t.shape)}, "
                        f"not the model's {m.dtype} {tuple(m.shape)}: it cannot join the round's sum"
                    )
            if slot >= 0:
                room = self.views(slot, like)
                if any(a.data_ptr() != b.data_ptr() for a, b in zip(tensors, room, strict=True)):
                    torch._foreach_copy_(room, tensors)  # trained elsewhere: park a copy
        elif slot >= 0:  # nothing to add: the slot is free again
            with self.lock:
                self._busy[slot] = 0
            slot = -1
        parkable = tensors is None or slot >= 0
        while True:
            with self.lock:
                nxt = self._counters[self.NEXT]
                if nxt == position:
                    break
                if parkable and position < nxt + self.table:
                    i = position % self.table
                    self._pos[i], self._slot[i], self._weight[i] = position, slot, weight
                    return
            time.sleep(WAIT_S)  # no slot to park in: wait for the chain to reach this position
        while True:  # this process extends the chain until it reaches a position still out
            if tensors is not None:
                self._add(tensors, weight, like)
            with self.lock:
                if slot >= 0:
                    self._busy[slot] = 0
                position += 1
                self._counters[self.NEXT] = position
                i = position % self.table
                if self._pos[i] != position:
                    return
                self._pos[i] = -1
                slot, weight = self._slot[i], self._weight[i]
            tensors = self.views(slot, like) if slot >= 0 else None

    def _add(self, tensors: list[torch.Tensor], weight: float, like: Sequence[torch.Tensor]) -> None:
        acc = self.sum_views(like)
        if self._counters[self.ADDED] == 0:
            torch._foreach_copy_(acc, torch._foreach_mul(tensors, weight))
        else:
            torch._foreach_add_(acc, tensors, alpha=weight)
        self._counters[self.ADDED] += 1


def slot_size(like: Sequence[torch.Tensor]) -> int:
    """Bytes of a :class:`Ledger` slot that holds tensors shaped like ``like``, or their sum."""
    offset = 0
    for t, (_, dtype) in zip(like, _summed(like), strict=True):
        offset = -(-offset // _ALIGN) * _ALIGN + t.numel() * max(t.element_size(), dtype.itemsize)
    return -(-max(offset, 1) // _ALIGN) * _ALIGN


_Layout = tuple[tuple[tuple[int, ...], torch.dtype], ...]


def _layout(like: Sequence[torch.Tensor]) -> _Layout:
    return tuple((tuple(t.shape), t.dtype) for t in like)


def _summed(like: Sequence[torch.Tensor]) -> _Layout:
    return tuple((tuple(t.shape), torch.result_type(t, 1.0)) for t in like)


def contiguous_shares(costs: Sequence[int], workers: int) -> list[list[int]]:
    """Positions ``0..n-1`` cut into ``workers`` consecutive runs of about equal total cost.

    Run ``k`` ends where the running cost first reaches ``(k + 1) / workers`` of the
    total; every run is non-empty while there are items left. Deterministic.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    n, total = len(costs), float(sum(costs))
    shares: list[list[int]] = []
    start, running = 0, 0.0
    for k in range(workers):
        end = start
        goal = total * (k + 1) / workers
        left_after = workers - k - 1
        while end < n - left_after and (end == start or running + costs[end] / 2 <= goal):
            running += costs[end]
            end += 1
        if k == workers - 1:
            while end < n:
                running += costs[end]
                end += 1
        shares.append(list(range(start, end)))
        start = end
    return shares
