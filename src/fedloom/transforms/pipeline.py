"""Update transforms: composable stages on a client's delta, with a client and a server side.

A stage has three hooks (pfl-research's postprocessor shape):

``client(update, ctx)``
    on the client, after local training (clip, add local noise, quantise, mask);
``decode(update, ctx)``
    on the server, per received update, before aggregation (dequantise, validate);
``server(aggregate, ctx)``
    on the server, after aggregation (central DP noise, unmask the sum).

A :class:`Pipeline` applies the client hooks in order and the server hooks in
reverse order, so each stage undoes its own encoding after the later stages
have undone theirs.

Codecs (:mod:`fedloom.transforms.compression`) are stages that *pack* the delta
(their class attribute ``packs`` is true) and need the model's names and shapes
to unpack it: :func:`bind_model` hands them the global model, and
:meth:`Pipeline.unpack` runs the decode of the trailing codec stages alone, so a
server can check the rebuilt delta (names, shapes, finiteness, norm bounds)
before the other stages' decode, as it does for a plain update.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from fedloom.algorithms.api import Aggregate, ClientUpdate, ServerContext
from fedloom.core.errors import UpdateError
from fedloom.core.params import Params

__all__ = ["Identity", "NormClip", "Pipeline", "UpdateTransform", "bind_model", "packs"]


class UpdateTransform(Protocol):
    """One stage of the pipeline: a client side, a per-update server side and an aggregate side."""

    def client(self, update: ClientUpdate, ctx: ServerContext) -> ClientUpdate: ...

    def decode(self, update: ClientUpdate, ctx: ServerContext) -> ClientUpdate: ...

    def server(self, aggregate: Aggregate, ctx: ServerContext) -> Aggregate: ...


@dataclass(frozen=True)
class Identity:
    """Leaves updates unchanged; the neutral element of a pipeline."""

    def client(self, update: ClientUpdate, ctx: ServerContext) -> ClientUpdate:
        return update

    def decode(self, update: ClientUpdate, ctx: ServerContext) -> ClientUpdate:
        return update

    def server(self, aggregate: Aggregate, ctx: ServerContext) -> Aggregate:
        return aggregate


@dataclass(frozen=True)
class NormClip:
    """Scale each client's delta so its global L2 norm is at most ``max_norm``.

    ``delta <- delta * min(1, max_norm / ||delta||_2)``; the pre-clip norm is
    reported as the ``update_norm`` metric. The server's ``decode`` refuses a
    larger norm (a tampered client), or with ``server_clip`` clips it again: a
    lossy codec after the clip (quantisation, error feedback) can raise an honest
    client's norm a little, and the bound must still hold for the aggregate.
    """

    max_norm: float
    server_clip: bool = False

    def __post_init__(self) -> None:
        if not self.max_norm > 0:
            raise ValueError(f"NormClip.max_norm must be > 0, got {self.max_norm}")

    def client(self, update: ClientUpdate, ctx: ServerContext) -> ClientUpdate:
        norm = update.delta.l2_norm()
        scale = min(1.0, self.max_norm / norm) if norm > 0 else 1.0
        delta = update.delta if scale == 1.0 else update.delta * scale
        return replace(update, delta=delta, metrics={**update.metrics, "update_norm": norm})

    def decode(self, update: ClientUpdate, ctx: ServerContext) -> ClientUpdate:
        norm = update.delta.l2_norm()
        if self.server_clip:
            return (
                update
                if norm <= self.max_norm
                else replace(update, delta=update.delta * (self.max_norm / norm))
            )
        # Honest clients already clipped; a larger norm means a tampered or buggy client.
        if norm > self.max_norm * (1 + 1e-5):
            raise UpdateError(
                f"client {update.client_id}: update norm {norm:.6g} exceeds the bound {self.max_norm}"
            )
        return update

    def server(self, aggregate: Aggregate, ctx: ServerContext) -> Aggregate:
        return aggregate


@dataclass(frozen=True)
class Pipeline:
    """A sequence of stages: client hooks in order, server hooks in reverse."""

    stages: Sequence[UpdateTransform] = ()

    def client(self, update: ClientUpdate, ctx: ServerContext) -> ClientUpdate:
        for stage in self.stages:
            update = stage.client(update, ctx)
        return update

    def decode(self, update: ClientUpdate, ctx: ServerContext) -> ClientUpdate:
        for stage in reversed(self.stages):
            update = stage.decode(update, ctx)
        return update

    def _codec_tail(self) -> int:
        """How many stages at the end of the pipeline are codecs."""
        n = 0
        for stage in reversed(self.stages):
            if not packs(stage):
                break
            n += 1
        return n

    def unpack(self, update: ClientUpdate, ctx: ServerContext) -> ClientUpdate:
        """The decode of the trailing codec stages only: a packed update back to a plain delta."""
        tail = self._codec_tail()
        for stage in reversed(self.stages[len(self.stages) - tail :]):
            update = stage.decode(update, ctx)
        return update

    def decode_unpacked(self, update: ClientUpdate, ctx: ServerContext) -> ClientUpdate:
        """The decode of every stage before the trailing codecs (``decode == decode_unpacked . unpack``)."""
        for stage in reversed(self.stages[: len(self.stages) - self._codec_tail()]):
            update = stage.decode(update, ctx)
        return update

    def server(self, aggregate: Aggregate, ctx: ServerContext) -> Aggregate:
        for stage in reversed(self.stages):
            aggregate = stage.server(aggregate, ctx)
        return aggregate


def packs(stage: object) -> bool:
    """Whether ``stage`` is a codec: its client side replaces the delta with a packed form."""
    return bool(getattr(stage, "packs", False))


def bind_model(pipeline: Pipeline, params: Params) -> Pipeline:
    """``pipeline`` with every codec stage given ``params`` (the model whose deltas it unpacks)."""
    if not any(packs(s) for s in pipeline.stages):
        return pipeline
    stages = [s.with_model(params) if packs(s) else s for s in pipeline.stages]  # type: ignore[attr-defined]
    return Pipeline(tuple(stages))
