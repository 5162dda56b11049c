"""DP stages: clipping bounds norms, noise has the configured std, adaptive clipping tracks the quantile."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.algorithms.aggregate import weighted_mean
from fedloom.algorithms.api import Aggregate, ClientUpdate, ServerContext
from fedloom.core.errors import UpdateError
from fedloom.core.params import Params
from fedloom.transforms.adaptive_clip import (
    STATE_KEY,
    UNCLIPPED,
    AdaptiveClipDP,
    advance_pipeline,
    bind_pipeline,
    delta_noise_multiplier,
)
from fedloom.transforms.dp import CentralDP, ClientClipDP, LocalDP, clip_to_norm
from fedloom.transforms.pipeline import Pipeline

CTX = ServerContext(seed=7, round=3, population=100)


def _update(cid: int, values: torch.Tensor, weight: float = 5.0) -> ClientUpdate:
    return ClientUpdate(
        client_id=cid, delta=Params({"w": values}), weight=weight, num_examples=5, num_steps=1
    )


def _round(stage: CentralDP | ClientClipDP | AdaptiveClipDP, updates: list[ClientUpdate]) -> Aggregate:
    pipe = Pipeline((stage,))
    decoded = [pipe.decode(pipe.client(u, CTX), CTX) for u in updates]
    delta, total = weighted_mean(decoded)
    return pipe.server(Aggregate(delta=delta, num_clients=len(decoded), total_weight=total), CTX)


@settings(max_examples=30, deadline=None)
@given(scale=st.floats(1e-3, 1e3), bound=st.floats(1e-2, 10.0), seed=st.integers(0, 2**31 - 1))
def test_clipping_bounds_every_norm(scale: float, bound: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    delta = Params({"a": torch.randn(7, generator=g) * scale, "b": torch.randn(3, 2, generator=g)})
    clipped, norm = clip_to_norm(delta, bound)
    assert clipped.l2_norm() <= bound * (1 + 1e-6)
    assert norm == pytest.approx(delta.l2_norm())
    if norm <= bound:
        assert clipped.equal(delta)


def test_central_dp_noise_on_the_mean_has_std_sigma_c_over_n() -> None:
    d, n, sigma, clip = 40_000, 8, 1.3, 0.5
    updates = [_update(c, torch.zeros(d)) for c in range(n)]
    out = _round(CentralDP(clip_norm=clip, noise_multiplier=sigma), updates).delta["w"].double()
    expected = sigma * clip / n
    # The sample std of d normals has relative standard error ~ 1/sqrt(2d) (0.35% here); allow 5 of them.
    tol = 5 / math.sqrt(2 * d)
    assert float(out.std()) == pytest.approx(expected, rel=tol)
    assert abs(float(out.mean())) < 5 * expected / math.sqrt(d)


def test_expected_clients_denominator_and_uniform_weights() -> None:
    updates = [_update(c, torch.full((4,), float(c + 1)), weight=float(10 * (c + 1))) for c in range(3)]
    agg = _round(CentralDP(clip_norm=100.0, noise_multiplier=0.0, expected_clients=4), updates)
    # Uniform weights (client weights ignored) and sum / 4: (1 + 2 + 3) / 4.
    assert torch.allclose(agg.delta["w"], torch.full((4,), 1.5))
    bad = Aggregate(delta=updates[0].delta, num_clients=3, total_weight=60.0)
    with pytest.raises(UpdateError, match="uniform-weight"):
        CentralDP(clip_norm=1.0, noise_multiplier=1.0).server(bad, CTX)


def test_central_dp_clips_in_decode_and_noise_is_reproducible() -> None:
    stage = CentralDP(clip_norm=1.0, noise_multiplier=0.5)
    dec = stage.decode(_update(0, torch.tensor([3.0, 4.0])), CTX)
    assert dec.delta.l2_norm() == pytest.approx(1.0)
    assert dec.weight == 1.0
    assert dec.metrics["update_norm"] == pytest.approx(5.0)
    ups = [_update(c, torch.ones(10)) for c in range(3)]
    assert _round(stage, ups).delta.equal(_round(stage, ups).delta)
    other = _round(stage, ups).delta
    ctx2 = replace(CTX, round=4)
    agg = Aggregate(delta=Params({"w": torch.zeros(10)}), num_clients=3, total_weight=3.0)
    assert not stage.server(agg, ctx2).delta.equal(other)


def test_client_clip_dp_clips_on_client_and_rejects_tampered_updates() -> None:
    stage = ClientClipDP(clip_norm=1.0, noise_multiplier=0.0)
    sent = stage.client(_update(0, torch.tensor([3.0, 4.0])), CTX)
    assert sent.delta.l2_norm() == pytest.approx(1.0)
    assert "update_norm" not in sent.metrics
    with pytest.raises(UpdateError, match="exceeds the DP clip norm"):
        stage.decode(_update(1, torch.tensor([3.0, 4.0])), CTX)


def test_local_dp_noise_per_client_has_std_sigma_c() -> None:
    d, sigma, clip = 40_000, 2.0, 0.1
    stage = LocalDP(clip_norm=clip, noise_multiplier=sigma)
    a = stage.client(_update(1, torch.zeros(d)), CTX).delta["w"].double()
    b = stage.client(_update(2, torch.zeros(d)), CTX).delta["w"].double()
    assert float(a.std()) == pytest.approx(sigma * clip, rel=5 / math.sqrt(2 * d))
    assert not torch.equal(a, b)  # independent streams per client
    assert stage.decode(_update(1, torch.zeros(3)), CTX).weight == 1.0


def test_delta_noise_split_composes_to_the_total() -> None:
    z, sb = 1.0, 5.0
    zd = delta_noise_multiplier(z, sb)
    assert zd**-2 + (2 * sb) ** -2 == pytest.approx(z**-2)
    with pytest.raises(ValueError, match="count_noise_std"):
        delta_noise_multiplier(1.0, 0.4)


def _simulate_adaptive(initial: float, rounds: int) -> list[float]:
    n = 100
    stage = AdaptiveClipDP(
        noise_multiplier=0.5, count_noise_std=n / 20, initial_clip=initial, target_quantile=0.5, clip_lr=0.2
    )
    pipe = Pipeline((stage,))
    algo_state: dict[str, Params] = {}
    unit = torch.zeros(10)
    unit[0] = 1.0  # every update has norm exactly 1
    clips = []
    for r in range(1, rounds + 1):
        ctx = replace(CTX, round=r)
        bound = bind_pipeline(pipe, algo_state)
        decoded = [bound.decode(_update(c, unit), ctx) for c in range(n)]
        algo_state = {**algo_state, **advance_pipeline(bound, decoded, ctx)}
        clips.append(float(algo_state[STATE_KEY]["clip_norm"].item()))
    return clips


@pytest.mark.parametrize("initial", [0.05, 20.0])
def test_adaptive_clip_converges_to_the_median_norm(initial: float) -> None:
    clips = _simulate_adaptive(initial, 80)
    # Monotone approach while on one side of 1, then it stays within one step factor of 1.
    first_cross = next(i for i, c in enumerate(clips) if (c >= 1) != (initial >= 1))
    side = clips[:first_cross]
    assert side == (sorted(side) if initial < 1 else sorted(side, reverse=True))
    tail = clips[-30:]
    assert all(math.exp(-0.2) * 0.9 < c < math.exp(0.2) * 1.1 for c in tail)


def test_adaptive_clip_marks_bits_and_state_round_trips() -> None:
    stage = AdaptiveClipDP(noise_multiplier=1.0, count_noise_std=5.0, initial_clip=2.0)
    small = stage.decode(_update(0, torch.tensor([1.0, 0.0])), CTX)
    big = stage.decode(_update(1, torch.tensor([3.0, 4.0])), CTX)
    assert small.metrics[UNCLIPPED] == 1.0
    assert big.metrics[UNCLIPPED] == 0.0
    assert big.delta.l2_norm() == pytest.approx(2.0)
    state = stage.advance([small, big], CTX)
    rebound = stage.bind(state)
    assert rebound.current_clip == float(state[STATE_KEY]["clip_norm"].item())
    assert stage.bind({}).current_clip == 2.0


def test_secure_noise_is_not_reproducible_from_the_seed() -> None:
    """Deployment noise comes from the OS CSPRNG: the same (seed, round) gives different noise."""
    from fedloom.core.rng import noise_rng

    a = torch.randn(8, generator=noise_rng(0, "dp-noise", round=1))
    b = torch.randn(8, generator=noise_rng(0, "dp-noise", round=1))
    assert torch.equal(a, b)
    c = torch.randn(8, generator=noise_rng(0, "dp-noise", round=1, secure=True))
    d = torch.randn(8, generator=noise_rng(0, "dp-noise", round=1, secure=True))
    assert not torch.equal(c, d)
