"""SecAgg+: Harary neighbourhood graphs of degree O(log n), and the protocol on them."""

from __future__ import annotations

import math

import numpy as np
import pytest

import fedloom.secagg as secagg
from fedloom.core.errors import ConfigError
from fedloom.core.rng import numpy_rng
from fedloom.secagg.graph import Graph, complete_graph, harary_graph, secagg_plus_degree
from fedloom.secagg.messages import ShareKeys
from fedloom.secagg.simulate import simulate_secure_sum


def _connected(g: Graph) -> bool:
    start = g.ids[0]
    seen, frontier = {start}, [start]
    while frontier:
        u = frontier.pop()
        for v in g.neighbours[u]:
            if v not in seen:
                seen.add(v)
                frontier.append(v)
    return len(seen) == len(g.ids)


@pytest.mark.parametrize("n", [16, 64, 256, 1024, 4096])
def test_harary_degree_is_logarithmic_regular_and_connected(n: int) -> None:
    k = secagg_plus_degree(n)
    g = harary_graph(range(n), k, numpy_rng(0, "secagg-graph"))
    degrees = {g.degree(u) for u in g.ids}
    assert degrees == {k}  # regular
    assert k <= 3 * math.log2(n) + 2  # O(log n)
    assert _connected(g)


def test_degree_over_log_n_stays_bounded_while_complete_grows_linearly() -> None:
    ratios = [secagg_plus_degree(n) / math.log2(n) for n in (64, 512, 4096, 32768)]
    assert max(ratios) <= 3.4
    assert secagg_plus_degree(32768) < 50 < 32767


def test_relabelling_depends_on_the_generator_and_is_reproducible() -> None:
    a = harary_graph(range(50), 10, numpy_rng(0, "g", round=1))
    b = harary_graph(range(50), 10, numpy_rng(0, "g", round=1))
    c = harary_graph(range(50), 10, numpy_rng(0, "g", round=2))
    assert a == b
    assert a != c


def test_small_populations_fall_back_to_complete() -> None:
    assert harary_graph(range(5), 6, numpy_rng(0, "g")) == complete_graph(range(5))
    with pytest.raises(ConfigError):
        harary_graph(range(50), 7, numpy_rng(0, "g"))
    with pytest.raises(ConfigError):
        Graph({0: (1,), 1: ()})  # asymmetric


def test_secagg_plus_recovers_the_sum_with_dropouts() -> None:
    rng = np.random.default_rng(5)
    xs = [rng.uniform(-1, 1, size=100) for _ in range(60)]
    r = simulate_secure_sum(
        xs, clip=1.0, graph="harary", dropouts_before_masking={3, 17}, dropouts_after_masking={8, 40}
    )
    assert r.graph.max_degree() == secagg_plus_degree(60) < 59
    assert set(r.included) == set(range(60)) - {3, 17}
    plain = np.sum([xs[i] for i in r.included], axis=0)
    assert np.max(np.abs(r.total - plain)) <= r.error_bound
    # Each client sent one sealed share per neighbour, not one per client.
    shares = [m for m in r.server_received if isinstance(m, ShareKeys)]
    assert {len(m.shares) for m in shares} == {r.graph.max_degree()}


def test_secagg_and_secagg_plus_give_the_same_sum() -> None:
    rng = np.random.default_rng(6)
    xs = [rng.uniform(-2, 2, size=300) for _ in range(40)]
    full = simulate_secure_sum(xs, clip=2.0, dropouts_before_masking={5, 6}, dropouts_after_masking={9})
    plus = simulate_secure_sum(
        xs,
        clip=2.0,
        graph="harary",
        degree=8,
        threshold=5,
        dropouts_before_masking={5, 6},
        dropouts_after_masking={9},
    )
    assert full.included == plus.included
    assert np.array_equal(full.total, plus.total)  # exact: same encoded sum
    assert plus.max_bytes_up < full.max_bytes_up


def test_secagg_plus_aborts_when_a_neighbourhood_loses_too_many() -> None:
    rng = np.random.default_rng(7)
    xs = [rng.uniform(-1, 1, size=10) for _ in range(30)]
    g = harary_graph(range(30), 6, numpy_rng(0, "secagg-graph", round=0))
    victim = 0
    nbrs = set(g.neighbours[victim])  # group of 7, threshold 5: three neighbours gone is too many
    gone = set(list(nbrs)[:3])
    with pytest.raises(secagg.SecAggAbort):
        simulate_secure_sum(
            xs, clip=1.0, graph="harary", degree=6, threshold=5, dropouts_after_masking=gone | {victim}
        )


def test_exported_members() -> None:
    assert set(secagg.__all__) == {
        "FixedPoint",
        "Graph",
        "ProtocolViolation",
        "RoundParams",
        "SecAggAbort",
        "SecAggError",
        "SecureSumResult",
        "ShareDecryptionError",
        "complete_graph",
        "decode_sum",
        "default_threshold",
        "encode",
        "harary_graph",
        "secagg_plus_degree",
        "simulate_secure_sum",
        "sum_error_bound",
    }
    for name in secagg.__all__:
        assert getattr(secagg, name) is not None
