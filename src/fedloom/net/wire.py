"""Chunked parameter transfer and the encoding of one client update (no grpc here).

A broadcast is ``slots_to_bytes({"params": ..., "x.<extra>": ...})``; an update is
``slots_to_bytes({"delta": ..., "x.<extra>": ...})`` plus a JSON header with the
scalars (weight, example and step counts, metrics). Both are safetensors blobs:
raw little-endian tensor buffers behind a small JSON header, never pickle. The blob
is cut into chunks of at most ``chunk_bytes`` so a model larger than gRPC's message
limit still travels.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from fedloom.algorithms.api import Broadcast, ClientUpdate
from fedloom.core.errors import RunStateError, UpdateError
from fedloom.core.params import Params
from fedloom.core.serde import slots_from_bytes, slots_to_bytes

__all__ = [
    "UpdateMeta",
    "chunk_size_for",
    "decode_broadcast",
    "decode_update",
    "encode_broadcast",
    "encode_update",
    "iter_chunks",
]

_EXTRA = "x."
# Room left in each gRPC message for the protobuf envelope and the upload header.
_ENVELOPE = 2048


def chunk_size_for(max_message_bytes: int) -> int:
    """The largest chunk payload that fits a gRPC message of ``max_message_bytes`` (at most 1 MiB)."""
    return max(1024, min(1 << 20, max_message_bytes - _ENVELOPE))


def iter_chunks(blob: bytes, chunk_bytes: int) -> Iterator[bytes]:
    """``blob`` cut into consecutive pieces of at most ``chunk_bytes`` (one empty piece if empty)."""
    view = memoryview(blob)
    n = max(1, math.ceil(len(blob) / chunk_bytes))
    for i in range(n):
        yield bytes(view[i * chunk_bytes : (i + 1) * chunk_bytes])


def encode_broadcast(b: Broadcast) -> bytes:
    slots: dict[str, Params] = {"params": b.params}
    slots.update({_EXTRA + k: v for k, v in b.extras.items()})
    return slots_to_bytes(slots)


def decode_broadcast(blob: bytes, round: int) -> Broadcast:
    try:
        slots = slots_from_bytes(blob)
    except RunStateError as exc:
        raise UpdateError(f"broadcast of round {round} does not parse: {exc}") from exc
    if "params" not in slots:
        raise UpdateError(f"broadcast of round {round} has no 'params' slot")
    extras = {k[len(_EXTRA) :]: v for k, v in slots.items() if k.startswith(_EXTRA)}
    return Broadcast(round=round, params=slots["params"], extras=extras)


@dataclass(frozen=True)
class UpdateMeta:
    """The scalar part of an update, sent as JSON in the first upload chunk."""

    weight: float
    num_examples: int
    num_steps: int
    metrics: Mapping[str, float]
    compute_s: float = 0.0

    def to_json(self) -> str:
        return json.dumps(
            {
                "weight": self.weight,
                "num_examples": self.num_examples,
                "num_steps": self.num_steps,
                "metrics": dict(self.metrics),
                "compute_s": self.compute_s,
            }
        )

    @staticmethod
    def from_json(text: str) -> UpdateMeta:
        """Parse and check the header; raises :class:`UpdateError` naming the bad field."""
        try:
            raw: Any = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UpdateError(f"update header is not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise UpdateError("update header must be a JSON object")
        problems: list[str] = []
        weight = raw.get("weight")
        if not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
            problems.append(f"weight = {weight!r}, expected a finite number > 0")
        for key in ("num_examples", "num_steps"):
            v = raw.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                problems.append(f"{key} = {v!r}, expected an integer >= 0")
        metrics = raw.get("metrics", {})
        if not isinstance(metrics, dict) or not all(
            isinstance(k, str) and isinstance(v, int | float) for k, v in metrics.items()
        ):
            problems.append("metrics must map names to numbers")
        compute = raw.get("compute_s", 0.0)
        if not isinstance(compute, int | float):
            problems.append(f"compute_s = {compute!r}, expected a number")
        if problems:
            raise UpdateError("bad update header: " + "; ".join(problems))
        return UpdateMeta(
            weight=float(weight),  # type: ignore[arg-type]
            num_examples=int(raw["num_examples"]),
            num_steps=int(raw["num_steps"]),
            metrics={str(k): float(v) for k, v in metrics.items()},
            compute_s=float(compute),
        )


def encode_update(update: ClientUpdate, *, compute_s: float = 0.0) -> tuple[str, bytes]:
    """The header JSON and tensor blob of ``update`` (its ``client_state`` stays on the client)."""
    slots: dict[str, Params] = {"delta": update.delta}
    slots.update({_EXTRA + k: v for k, v in update.extras.items()})
    meta = UpdateMeta(
        weight=update.weight,
        num_examples=update.num_examples,
        num_steps=update.num_steps,
        metrics=update.metrics,
        compute_s=compute_s,
    )
    return meta.to_json(), slots_to_bytes(slots)


def decode_update(client_id: int, meta_json: str, blob: bytes) -> tuple[ClientUpdate, float]:
    """Rebuild a :class:`ClientUpdate` and the client's reported compute seconds.

    Raises :class:`UpdateError` when the header or the blob does not parse; shape
    and value checks are the coordinator's job.
    """
    meta = UpdateMeta.from_json(meta_json)
    try:
        slots = slots_from_bytes(blob)
    except (RunStateError, ValueError, KeyError, TypeError) as exc:
        raise UpdateError(f"update blob does not parse: {exc}") from None
    except Exception as exc:  # safetensors raises its own error type on corrupt buffers
        raise UpdateError(f"update blob does not parse: {type(exc).__name__}: {exc}") from None
    if "delta" not in slots:
        raise UpdateError(f"update blob has slots {sorted(slots)}, expected a 'delta' slot")
    extras = {k[len(_EXTRA) :]: v for k, v in slots.items() if k.startswith(_EXTRA)}
    unknown = sorted(k for k in slots if k != "delta" and not k.startswith(_EXTRA))
    if unknown:
        raise UpdateError(f"update blob has unexpected slots {unknown}")
    update = ClientUpdate(
        client_id=client_id,
        delta=slots["delta"],
        weight=meta.weight,
        num_examples=meta.num_examples,
        num_steps=meta.num_steps,
        metrics=meta.metrics,
        extras=extras,
    )
    return update, meta.compute_s
