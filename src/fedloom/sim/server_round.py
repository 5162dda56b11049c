"""The server side of one round, shared by every runtime: decode, aggregate, update.

Given the outcomes a runtime collected (from in-process executors or from gRPC
clients), :func:`finish_round` runs the pipeline's ``decode`` on each update
(turning rejections into :class:`ClientFailure` values), aggregates -- with the
algorithm's rule, or through secure aggregation when it is configured -- runs
the pipeline's ``server`` side and the algorithm's ``server_update``, and
advances the state of stateful transforms (adaptive clipping) into
``ServerState.algo_state`` so that it is checkpointed with the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from fedloom.algorithms.api import Aggregate, Algorithm, ClientUpdate, ServerContext, ServerState
from fedloom.core.errors import FedloomError
from fedloom.sim.executor import ClientFailure, Outcome, torch_threads
from fedloom.transforms.adaptive_clip import advance_pipeline, bind_pipeline
from fedloom.transforms.pipeline import Pipeline, bind_model

__all__ = ["RoundResult", "SecureSum", "apply_updates", "decode_outcomes", "finish_round"]


@dataclass(frozen=True)
class SecureSum:
    """Secure aggregation settings for :func:`finish_round` (see :mod:`fedloom.secagg`)."""

    clip: float
    max_weight: float
    graph: str = "complete"
    degree: int = 0
    threshold: int = 0
    bits: int = 32
    dropout_after_masking: float = 0.0
    # compression.codec = "qsgd": quantise stochastically into a ring of width ring_bits(quant_bits, n).
    quant_bits: int = 0

    def aggregate(
        self, updates: Sequence[ClientUpdate], ctx: ServerContext
    ) -> tuple[Aggregate, dict[str, Any]]:
        """The weighted-mean aggregate computed by the SecAgg protocol over ``updates``."""
        from fedloom.algorithms.stragglers import accepted
        from fedloom.core.rng import numpy_rng
        from fedloom.secagg.simulate import simulate_secure_sum
        from fedloom.secagg.updates import aggregate_from_sum, flatten_weighted
        from fedloom.transforms.compression.ring import RING_PURPOSE, quantize_into_ring, ring_fixed_point

        kept = accepted(updates)
        vectors = [flatten_weighted(u, max_weight=self.max_weight) for u in kept]
        n = len(vectors)
        k = int(self.dropout_after_masking * n)
        dropped = numpy_rng(ctx.seed, "secagg-dropout", round=ctx.round).choice(n, size=k, replace=False)
        fp, encoded, bits = None, None, self.bits
        if self.quant_bits:
            fp = ring_fixed_point(self.clip, self.quant_bits, n)
            bits = fp.bits
            encoded = [
                quantize_into_ring(
                    v, fp, numpy_rng(ctx.seed, RING_PURPOSE, round=ctx.round, client=u.client_id)
                )
                for v, u in zip(vectors, kept, strict=True)
            ]
        result = simulate_secure_sum(
            vectors,
            clip=self.clip,
            threshold=self.threshold or None,
            graph="harary" if self.graph == "harary" else "complete",
            degree=self.degree or None,
            bits=bits,
            dropouts_after_masking=[int(i) for i in dropped],
            seed=ctx.seed,
            round=ctx.round,
            fixed_point=fp,
            encoded=encoded,
        )
        agg = aggregate_from_sum(
            result.total, kept[0].delta, max_weight=self.max_weight, num_clients=len(result.included)
        )
        return agg, {"secagg_bytes_up": result.max_bytes_up, "secagg_dropouts": k, "secagg_ring_bits": bits}


@dataclass(frozen=True)
class RoundResult:
    state: ServerState
    updates: list[ClientUpdate]
    failures: list[ClientFailure]
    metrics: dict[str, Any]


def decode_outcomes(
    pipeline: Pipeline, state: ServerState, outcomes: Sequence[Outcome], ctx: ServerContext
) -> tuple[list[ClientUpdate], list[ClientFailure]]:
    """Run the (state-bound) pipeline's ``decode`` on each update; rejections become failures.

    Codec stages unpack against ``state.params`` (see :func:`~fedloom.transforms.pipeline.bind_model`).
    """
    bound = bind_model(bind_pipeline(pipeline, state.algo_state), state.params)
    updates: list[ClientUpdate] = []
    failures: list[ClientFailure] = []
    for o in outcomes:
        if isinstance(o, ClientUpdate):
            try:
                updates.append(bound.decode(o, ctx))
            except FedloomError as exc:
                failures.append(ClientFailure(o.client_id, str(exc)))
        else:
            failures.append(o)
    return updates, failures


def apply_updates(
    algorithm: Algorithm,
    pipeline: Pipeline,
    state: ServerState,
    updates: Sequence[ClientUpdate],
    ctx: ServerContext,
    *,
    secure: SecureSum | None = None,
    precomputed: Aggregate | None = None,
) -> tuple[ServerState, dict[str, Any]]:
    """Aggregate decoded ``updates`` (at least one), run the server side, return the new state.

    Used by the simulation loop and by the gRPC server alike. ``precomputed`` is an
    aggregate made elsewhere (the deployed secure sum, where the server holds no
    individual update): it replaces aggregation, and ``updates`` may then be empty.

    It runs with one torch thread, like every client, so that the new model does not
    depend on how torch shares a kernel's elements between threads: with the default
    threads, a seeded FedAdam run on a loaded machine ended on one of two models that
    differ in their last bits, from one run to the next; with one thread, on one.
    """
    with torch_threads(1):
        return _apply_updates(algorithm, pipeline, state, updates, ctx, secure, precomputed)


def _apply_updates(
    algorithm: Algorithm,
    pipeline: Pipeline,
    state: ServerState,
    updates: Sequence[ClientUpdate],
    ctx: ServerContext,
    secure: SecureSum | None,
    precomputed: Aggregate | None,
) -> tuple[ServerState, dict[str, Any]]:
    bound = bind_pipeline(pipeline, state.algo_state)
    metrics: dict[str, Any] = {}
    if precomputed is not None:
        aggregate = precomputed
    elif secure is not None:
        aggregate, metrics = secure.aggregate(updates, ctx)
    else:
        aggregate = algorithm.aggregate(updates, ctx)
    aggregate = bound.server(aggregate, ctx)
    new_state = algorithm.server_update(state, aggregate, ctx)
    advanced = advance_pipeline(bound, updates, ctx)
    if advanced:
        new_state = replace(new_state, algo_state={**new_state.algo_state, **advanced})
    return new_state, metrics


def finish_round(
    algorithm: Algorithm,
    pipeline: Pipeline,
    state: ServerState,
    outcomes: Sequence[Outcome],
    ctx: ServerContext,
    *,
    secure: SecureSum | None = None,
    precomputed: Aggregate | None = None,
) -> RoundResult:
    """:func:`decode_outcomes` then, if any update was accepted, :func:`apply_updates`.

    ``precomputed`` is the round's aggregate reduced by the executor's workers
    (:mod:`fedloom.sim.reduce`); ``outcomes`` then carry no deltas, only what the
    round's metrics and client states need. Secure-aggregation aborts
    (:class:`~fedloom.secagg.errors.SecAggError`) propagate.
    """
    updates, failures = decode_outcomes(pipeline, state, outcomes, ctx)
    if not updates:
        return RoundResult(state=state, updates=updates, failures=failures, metrics={})
    new_state, metrics = apply_updates(
        algorithm, pipeline, state, updates, ctx, secure=secure, precomputed=precomputed
    )
    return RoundResult(state=new_state, updates=updates, failures=failures, metrics=metrics)
