"""Communication graphs: who exchanges masks and Shamir shares with whom.

Bonawitz et al. 2017 (ePrint 2017/281) use the complete graph: every client
masks against, and shares its secrets with, every other client, so per-client
cost is O(n) and total cost O(n^2). SecAgg+ (Bell et al. 2020, ePrint
2020/704) replaces it with a sparse random graph of degree ``k = O(log n)``:
masks still cancel pairwise along edges, and each client's secrets are shared
only among its ``k`` neighbours (plus itself), so per-client cost is O(log n).

We use a Harary graph ``H(k, n)`` -- a ring where each vertex links to the
``k/2`` nearest on each side, the ``k``-connected graph with fewest edges --
with the vertex labels randomly permuted so that no client can choose its
neighbours. A graph is plain data (``id -> sorted neighbour ids``, never
including the id itself) chosen by the server and announced to clients through
their rosters.

Notes
-----
Threat model: the relabelling only has to be unpredictable to clients; an
honest-but-curious server knows the graph anyway. In simulation it is drawn
from a generator derived from (seed, round, "secagg-graph") for reproducibility.
Bell et al. prove security and correctness w.h.p. when ``k`` grows like
``log n`` with constants set by the tolerated corruption and dropout rates;
:func:`secagg_plus_degree` uses ``k >= 3 log2 n``, a practical default, not a proof.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedloom.core.errors import ConfigError

__all__ = ["Graph", "complete_graph", "default_threshold", "harary_graph", "secagg_plus_degree"]


@dataclass(frozen=True)
class Graph:
    """An undirected, loop-free graph over client ids: ``neighbours[u]`` is sorted and excludes ``u``."""

    neighbours: Mapping[int, tuple[int, ...]]

    def __post_init__(self) -> None:
        for u, nbrs in self.neighbours.items():
            if u in nbrs or list(nbrs) != sorted(set(nbrs)):
                raise ConfigError([f"graph: neighbours of {u} must be sorted, distinct and exclude {u}"])
            for v in nbrs:
                if u not in self.neighbours.get(v, ()):
                    raise ConfigError([f"graph: edge {u}-{v} is not symmetric"])

    @property
    def ids(self) -> tuple[int, ...]:
        return tuple(sorted(self.neighbours))

    def degree(self, u: int) -> int:
        return len(self.neighbours[u])

    def max_degree(self) -> int:
        return max((len(n) for n in self.neighbours.values()), default=0)


def complete_graph(ids: Sequence[int]) -> Graph:
    """Every client adjacent to every other (original SecAgg)."""
    s = sorted(set(ids))
    return Graph({u: tuple(v for v in s if v != u) for u in s})


def secagg_plus_degree(n: int) -> int:
    """Default SecAgg+ degree: the smallest even ``k >= 3 log2 n``, capped at ``n - 1``."""
    if n <= 1:
        return 0
    k = math.ceil(3 * math.log2(n))
    k += k % 2
    return min(k, n - 1)


def harary_graph(ids: Sequence[int], degree: int, rng: np.random.Generator) -> Graph:
    """A randomly relabelled Harary graph of even ``degree`` over ``ids`` (complete if ``degree >= n - 1``).

    Raises :class:`ConfigError` for a negative or odd degree below ``n - 1``.
    """
    s = sorted(set(ids))
    n = len(s)
    if degree >= n - 1:
        return complete_graph(s)
    if degree < 0 or degree % 2:
        raise ConfigError([f"harary_graph: degree must be even and >= 0 (or >= n-1), got {degree}"])
    order = [s[i] for i in rng.permutation(n)]  # position -> client id
    nbrs: dict[int, set[int]] = {u: set() for u in s}
    for pos, u in enumerate(order):
        for step in range(1, degree // 2 + 1):
            v = order[(pos + step) % n]
            nbrs[u].add(v)
            nbrs[v].add(u)
    return Graph({u: tuple(sorted(vs)) for u, vs in nbrs.items()})


def default_threshold(group_size: int) -> int:
    """``floor(2m/3) + 1`` for a share group of ``m`` holders (a neighbourhood plus its owner).

    In the honest-but-curious setting the server together with fewer than ``t``
    colluding holders learns nothing beyond the sum (Bonawitz et al., ePrint
    2017/281, Sec. 6.2); two thirds is the paper's bound for an active server and
    leaves room for a third of a group to drop out.
    """
    return (2 * group_size) // 3 + 1
