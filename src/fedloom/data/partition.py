"""Seeded partitioners: how a pooled dataset is split across clients.

Every partitioner returns ``list[np.ndarray]``, one int64 array of example
indices per client, sorted ascending. Unless stated otherwise the arrays are
disjoint and together cover every example exactly once. Randomness comes only
from the ``numpy.random.Generator`` passed in; :func:`partition` derives it from
the experiment seed with ``numpy_rng(seed, "partition")``.

Schemes:
  * :func:`iid` - uniform random split into near-equal sizes.
  * :func:`dirichlet` - label skew, class proportions over clients ~ Dir(alpha)
    (Hsu et al. 2019, arXiv 1909.06335; Li et al. 2021 NIID-Bench, arXiv 2102.02079).
  * :func:`shards` - the "pathological non-IID" split of McMahan et al. 2017
    (arXiv 1602.05629): sort by label, cut into shards, deal shards to clients.
  * :func:`quantity_skew` - IID examples, client sizes from a lognormal.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fedloom.core.errors import DataError
from fedloom.core.rng import numpy_rng

__all__ = [
    "Partitioner",
    "available_schemes",
    "dirichlet",
    "iid",
    "partition",
    "quantity_skew",
    "register_scheme",
    "shards",
]

#: A registered scheme: ``(labels, num_clients, rng, **options) -> index arrays``.
Partitioner = Callable[..., list[np.ndarray]]


def _check_num_clients(num_clients: int) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise DataError(f"num_clients must be an integer >= 1, got {num_clients!r}")


def _check_labels(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    arr = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"labels must be a 1-D integer array, got dtype {arr.dtype} shape {arr.shape}")
    if arr.size and int(arr.min()) < 0:
        raise DataError(f"labels must be >= 0, found {int(arr.min())}")
    return arr


def _split_sorted(perm: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    """Cut ``perm`` into consecutive pieces of ``sizes`` and sort each piece."""
    pieces = np.split(perm, np.cumsum(sizes)[:-1])
    return [np.sort(p).astype(np.int64, copy=False) for p in pieces]


def _proportional_counts(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total``, proportional to ``weights`` (floored cumulative cuts)."""
    cuts = np.floor(np.cumsum(weights) / weights.sum() * total).astype(np.int64)
    cuts[-1] = total  # guard against float round-off in the last cut
    return np.diff(cuts, prepend=0)


def iid(num_examples: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle ``range(num_examples)`` and split it into ``num_clients`` near-equal parts.

    Sizes differ by at most one. Requires ``num_examples >= num_clients`` so that
    no client is empty.
    """
    _check_num_clients(num_clients)
    if num_examples < num_clients:
        raise DataError(f"iid: num_examples={num_examples} is smaller than num_clients={num_clients}")
    base, extra = divmod(num_examples, num_clients)
    sizes = np.full(num_clients, base, dtype=np.int64)
    sizes[:extra] += 1
    return _split_sorted(rng.permutation(num_examples), sizes)


def dirichlet(
    labels: np.ndarray | torch.Tensor,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    *,
    min_size: int = 1,
    max_attempts: int = 100,
) -> list[np.ndarray]:
    """Label-skewed split: for each class, client shares are drawn from Dir(alpha).

    For every class ``c`` independently, draw ``p ~ Dir(alpha * 1_K)`` over the
    ``K = num_clients`` clients, shuffle the indices of class ``c`` and give client
    ``k`` a consecutive run of ``floor``-rounded size ``p_k * n_c``. Small ``alpha``
    (e.g. 0.1) gives clients dominated by a few labels; large ``alpha`` (e.g. 100)
    approaches the global label distribution on every client.

    The whole draw is repeated until every client has at least ``min_size``
    examples (at most ``max_attempts`` times).

    Raises:
        DataError: on invalid arguments, or when no draw within ``max_attempts``
            satisfies ``min_size`` (advice: raise ``alpha``, lower ``min_size`` or
            use fewer clients).
    """
    y = _check_labels(labels)
    _check_num_clients(num_clients)
    if not alpha > 0 or not np.isfinite(alpha):
        raise DataError(f"dirichlet: alpha must be a finite number > 0, got {alpha!r}")
    if min_size < 0:
        raise DataError(f"dirichlet: min_size must be >= 0, got {min_size}")
    if max_attempts < 1:
        raise DataError(f"dirichlet: max_attempts must be >= 1, got {max_attempts}")
    if y.size < num_clients * min_size:
        raise DataError(
            f"dirichlet: {y.size} examples cannot give {num_clients} clients "
            f"at least min_size={min_size} each"
        )
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    smallest = 0
    for _ in range(max_attempts):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for members in by_class:
            shares = rng.dirichlet(np.full(num_clients, float(alpha)))
            counts = _proportional_counts(shares, members.size)
            for k, piece in enumerate(np.split(rng.permutation(members), np.cumsum(counts)[:-1])):
                parts[k].append(piece)
        sizes = [sum(p.size for p in client) for client in parts]
        smallest = min(sizes)
        if smallest >= min_size:
            return [np.sort(np.concatenate(client)).astype(np.int64, copy=False) for client in parts]
    raise DataError(
        f"dirichlet: after {max_attempts} draws some client still had fewer than min_size={min_size} "
        f"examples (smallest was {smallest}) with alpha={alpha} and {num_clients} clients; "
        "raise alpha, lower min_size, use fewer clients or raise max_attempts"
    )


def shards(
    labels: np.ndarray | torch.Tensor,
    num_clients: int,
    rng: np.random.Generator,
    *,
    shards_per_client: int = 2,
    shard_size: int | None = None,
) -> list[np.ndarray]:
    """McMahan et al. 2017 (arXiv 1602.05629) pathological non-IID split.

    Sort the examples by label (stable, so ties keep dataset order), cut the
    first ``num_shards * shard_size`` of them into ``num_shards = num_clients *
    shards_per_client`` consecutive shards, and deal ``shards_per_client``
    random shards to each client. ``shard_size`` defaults to
    ``N // num_shards``; MNIST's 60000 examples over 100 clients gives 200 shards
    of 300. Each shard holds one label, or two where it straddles a label
    boundary.

    Every example is assigned at most once; the ``N - num_shards * shard_size``
    leftover examples (the last in label order) are assigned to no client.

    Raises:
        DataError: on invalid arguments, or when ``num_shards * shard_size > N``.
    """
    y = _check_labels(labels)
    _check_num_clients(num_clients)
    if shards_per_client < 1:
        raise DataError(f"shards: shards_per_client must be >= 1, got {shards_per_client}")
    num_shards = num_clients * shards_per_client
    size = y.size // num_shards if shard_size is None else shard_size
    if size < 1 or num_shards * size > y.size:
        raise DataError(
            f"shards: {num_clients} clients x {shards_per_client} shards x shard_size {size} needs "
            f"{num_shards * max(size, 1)} examples but there are only {y.size}; "
            "use fewer clients, fewer shards per client or a smaller shard_size"
        )
    order = np.argsort(y, kind="stable")
    table = order[: num_shards * size].reshape(num_shards, size)  # (num_shards, shard_size)
    dealt = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [np.sort(table[row].ravel()).astype(np.int64, copy=False) for row in dealt]


def quantity_skew(
    num_examples: int,
    num_clients: int,
    rng: np.random.Generator,
    *,
    sigma: float = 1.0,
    min_size: int = 1,
) -> list[np.ndarray]:
    """IID examples with lognormal client sizes.

    Each client gets ``min_size`` examples plus a share of the remaining
    ``num_examples - num_clients * min_size`` proportional to a
    ``LogNormal(0, sigma)`` weight; ``sigma = 0`` gives equal sizes (up to
    rounding). Examples are dealt from one random permutation.

    Raises:
        DataError: on invalid arguments or too few examples for ``min_size``.
    """
    _check_num_clients(num_clients)
    if not sigma >= 0 or not np.isfinite(sigma):
        raise DataError(f"quantity_skew: sigma must be a finite number >= 0, got {sigma!r}")
    if min_size < 0:
        raise DataError(f"quantity_skew: min_size must be >= 0, got {min_size}")
    spare = num_examples - num_clients * min_size
    if spare < 0:
        raise DataError(
            f"quantity_skew: {num_examples} examples cannot give {num_clients} clients "
            f"at least min_size={min_size} each"
        )
    weights = rng.lognormal(0.0, sigma, num_clients)
    if not np.isfinite(weights.sum()):
        raise DataError(
            f"quantity_skew: sigma={sigma} is too large (the size weights overflow); use sigma <= 10"
        )
    sizes = min_size + _proportional_counts(weights, spare)
    return _split_sorted(rng.permutation(num_examples), sizes)


def _iid_scheme(labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    return iid(labels.size, num_clients, rng)


def _quantity_scheme(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, *, sigma: float = 1.0, min_size: int = 1
) -> list[np.ndarray]:
    return quantity_skew(labels.size, num_clients, rng, sigma=sigma, min_size=min_size)


def _dirichlet_scheme(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    alpha: float,
    min_size: int = 1,
    max_attempts: int = 100,
) -> list[np.ndarray]:
    return dirichlet(labels, num_clients, alpha, rng, min_size=min_size, max_attempts=max_attempts)


_REGISTRY: dict[str, Partitioner] = {}


def register_scheme(name: str, fn: Partitioner) -> None:
    """Make ``fn`` available to :func:`partition` as ``name``.

    ``fn`` is called as ``fn(labels, num_clients, rng, **options)``; its
    keyword-only parameters are the options the scheme accepts.

    Raises:
        DataError: if ``name`` is already registered.
    """
    if name in _REGISTRY:
        raise DataError(f"partition scheme {name!r} is already registered; choose another name")
    _REGISTRY[name] = fn


def available_schemes() -> list[str]:
    """Names accepted by :func:`partition`, sorted."""
    return sorted(_REGISTRY)


register_scheme("iid", _iid_scheme)
register_scheme("dirichlet", _dirichlet_scheme)
register_scheme("shards", shards)
register_scheme("quantity_skew", _quantity_scheme)


def partition(
    labels: np.ndarray | torch.Tensor, scheme: str, num_clients: int, seed: int, **options: Any
) -> list[np.ndarray]:
    """Split examples with labels ``labels`` into ``num_clients`` clients by ``scheme``.

    The generator is ``numpy_rng(seed, "partition")``, so the same
    ``(labels, scheme, num_clients, seed, options)`` always gives the same split.

    Raises:
        DataError: for an unknown scheme or option (naming the accepted ones), or
            whatever the scheme itself rejects.
    """
    fn = _REGISTRY.get(scheme)
    if fn is None:
        raise DataError(f"unknown partition scheme {scheme!r}; available: {', '.join(available_schemes())}")
    params = inspect.signature(fn).parameters.values()
    accepted = {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    required = {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is p.empty}
    unknown = sorted(set(options) - accepted)
    missing = sorted(required - set(options))
    problems = []
    if unknown:
        problems.append(f"unknown option(s) {unknown}")
    if missing:
        problems.append(f"missing option(s) {missing}")
    if problems:
        raise DataError(
            f"partition scheme {scheme!r}: {'; '.join(problems)}; "
            f"accepted options: {sorted(accepted) or 'none'}"
        )
    return fn(_check_labels(labels), num_clients, numpy_rng(seed, "partition"), **options)
