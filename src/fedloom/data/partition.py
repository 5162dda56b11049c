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
  * :func:`sized` - IID examples, client sizes linear, square or exponential in the client id.
  * :func:`pathological` - every client holds exactly ``k`` classes.
  * :func:`inner_dirichlet` - fixed client sizes, each client's label mix ~ Dir(alpha * prior).
  * :func:`natural` - one client per distinct value of an id column.

The number of classes is always read from the labels, never assumed.
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
    "SIZE_DISTRIBUTIONS",
    "Partitioner",
    "available_schemes",
    "client_sizes",
    "dirichlet",
    "iid",
    "inner_dirichlet",
    "natural",
    "partition",
    "pathological",
    "quantity_skew",
    "register_scheme",
    "shards",
    "sized",
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


#: Shapes of client-size distributions for :func:`client_sizes`.
SIZE_DISTRIBUTIONS = ("equal", "lognormal", "linear", "square", "exponential")


def client_sizes(
    num_examples: int,
    num_clients: int,
    rng: np.random.Generator,
    *,
    distribution: str = "equal",
    min_size: int = 1,
    sigma: float = 1.0,
    rate: float = 0.1,
) -> np.ndarray:
    """int64 client sizes that sum to ``num_examples``, shaped by ``distribution``.

    Client ``k`` (``k = 0..K-1``) gets ``min_size`` examples plus a share of the
    remaining ``num_examples - K * min_size`` proportional to a weight ``w_k``,
    rounded by floored cumulative cuts (so the sizes sum exactly):

    * ``"equal"``: ``w_k = 1`` (sizes differ by at most one);
    * ``"lognormal"``: ``w_k ~ LogNormal(0, sigma)`` drawn from ``rng``;
    * ``"linear"``: ``w_k = k + 1``;
    * ``"square"``: ``w_k = (k + 1)^2``;
    * ``"exponential"``: ``w_k = exp(rate * k)``.

    Only ``"lognormal"`` draws from ``rng``; the others are deterministic and
    ascending in the client id.

    Raises:
        DataError: on an unknown distribution, invalid numbers, or too few
            examples for ``min_size``.
    """
    _check_num_clients(num_clients)
    if distribution not in SIZE_DISTRIBUTIONS:
        raise DataError(
            f"client sizes: unknown distribution {distribution!r}; expected one of {', '.join(SIZE_DISTRIBUTIONS)}"
        )
    if min_size < 0:
        raise DataError(f"client sizes: min_size must be >= 0, got {min_size}")
    spare = num_examples - num_clients * min_size
    if spare < 0:
        raise DataError(
            f"client sizes: {num_examples} examples cannot give {num_clients} clients "
            f"at least min_size={min_size} each"
        )
    k = np.arange(num_clients, dtype=np.float64)
    if distribution == "lognormal":
        if not sigma >= 0 or not np.isfinite(sigma):
            raise DataError(f"client sizes: sigma must be a finite number >= 0, got {sigma!r}")
        weights = rng.lognormal(0.0, sigma, num_clients)
    elif distribution == "linear":
        weights = k + 1.0
    elif distribution == "square":
        weights = (k + 1.0) ** 2
    elif distribution == "exponential":
        if not rate > 0 or not np.isfinite(rate):
            raise DataError(f"client sizes: rate must be a finite number > 0, got {rate!r}")
        # exp(rate * (k - (K-1))) is exp(rate * k) scaled by a constant, and cannot overflow.
        weights = np.exp(rate * (k - (num_clients - 1)))
    else:
        weights = np.ones(num_clients)
    if not np.isfinite(weights.sum()) or weights.sum() <= 0:
        raise DataError(
            f"client sizes: the {distribution} weights overflow or vanish (sigma={sigma}, rate={rate}); "
            "use a smaller sigma or rate"
        )
    # Multiply before dividing so that integer weights give exact cuts (28 * 550 / 55 == 280).
    cuts = np.floor(np.cumsum(weights) * spare / weights.sum()).astype(np.int64)
    cuts[-1] = spare
    sizes: np.ndarray = np.diff(cuts, prepend=0) + min_size
    return sizes


def sized(
    num_examples: int,
    num_clients: int,
    rng: np.random.Generator,
    *,
    distribution: str = "linear",
    min_size: int = 1,
    rate: float = 0.1,
) -> list[np.ndarray]:
    """IID examples with client sizes following ``distribution`` (see :func:`client_sizes`).

    ``"linear"``, ``"square"`` and ``"exponential"`` give client ``k`` a size
    proportional to ``k + 1``, ``(k + 1)^2`` and ``exp(rate * k)`` (after
    ``min_size`` each). Examples are dealt from one random permutation.
    """
    sizes = client_sizes(
        num_examples, num_clients, rng, distribution=distribution, min_size=min_size, rate=rate
    )
    return _split_sorted(rng.permutation(num_examples), sizes)


def pathological(
    labels: np.ndarray | torch.Tensor,
    num_clients: int,
    rng: np.random.Generator,
    *,
    classes_per_client: int = 2,
) -> list[np.ndarray]:
    """Every client holds examples of exactly ``classes_per_client`` classes.

    With ``C`` classes present in ``labels`` (counted from the data) and ``k =
    classes_per_client``, a sequence of ``K k`` class slots is built from
    independent random permutations of the ``C`` classes laid end to end, and
    client ``i`` takes slots ``i k .. i k + k - 1``. Where a client's slots run
    from one permutation into the next, the next one is reordered (its classes
    keep their random order) so that the client's ``k`` classes stay distinct.
    So every class goes to ``floor`` or ``ceil`` of ``K k / C`` clients, and
    clients get varied combinations of classes. Each class's examples are
    shuffled and split in near-equal parts among the clients holding it, so
    every example is assigned exactly once (the "#C = k" label skew of Li et al.
    2021, NIID-Bench, arXiv 2102.02079).

    Raises:
        DataError: if ``k`` exceeds the number of classes, ``K k < C`` (some
            class would have no client), or a class has fewer examples than
            clients holding it.
    """
    y = _check_labels(labels)
    _check_num_clients(num_clients)
    classes = np.unique(y)
    c, k = classes.size, classes_per_client
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise DataError(f"pathological: classes_per_client must be an integer >= 1, got {k!r}")
    if k > c:
        raise DataError(f"pathological: classes_per_client={k} but the labels hold only {c} classes")
    if num_clients * k < c:
        raise DataError(
            f"pathological: {num_clients} clients x {k} classes cannot cover all {c} classes; "
            "use more clients or more classes per client"
        )
    seq: list[int] = []
    while len(seq) < num_clients * k:
        perm = [int(v) for v in rng.permutation(c)]
        filled = len(seq) % k  # slots of the current client already taken from the previous permutation
        if filled:
            taken = set(seq[-filled:])
            perm = [v for v in perm if v not in taken] + [v for v in perm if v in taken]
        seq.extend(perm)
    slots = np.array(seq[: num_clients * k]).reshape(num_clients, k)  # (clients, k) class positions
    holders: list[list[int]] = [[] for _ in range(c)]
    for client in range(num_clients):
        for slot in slots[client]:
            holders[int(slot)].append(client)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for slot, cls in enumerate(classes):
        members = rng.permutation(np.flatnonzero(y == cls))
        owners = holders[slot]
        if members.size < len(owners):
            raise DataError(
                f"pathological: class {int(cls)} has {members.size} examples but {len(owners)} clients hold it; "
                "use fewer clients or fewer classes per client"
            )
        for client, piece in zip(owners, np.array_split(members, len(owners)), strict=True):
            parts[client].append(piece)
    return [np.sort(np.concatenate(p)).astype(np.int64, copy=False) for p in parts]


def inner_dirichlet(
    labels: np.ndarray | torch.Tensor,
    num_clients: int,
    rng: np.random.Generator,
    *,
    alpha: float,
    sizes: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Fixed client sizes, each client's label mix drawn from a Dirichlet.

    Client ``k`` draws its class proportions ``q_k ~ Dir(alpha * pi)``, where
    ``pi`` is the global class distribution of ``labels``, then is filled in id
    order: ``sizes[k]`` examples are drawn as ``Multinomial(need, q_k)`` over
    the classes that still have examples (``q_k`` renormalised to them), taking
    at most what a class has left, until the client is full. While no class runs
    out, a client's label counts are exactly ``Multinomial(sizes[k], q_k)``;
    the last clients take what remains. (The "client-inner Dirichlet" split of
    FedLab, Zeng et al. 2021, arXiv 2107.11621.)

    ``sizes`` defaults to near-equal sizes; it must have ``num_clients`` entries
    summing to the number of examples. Every example is assigned exactly once.

    Raises:
        DataError: on invalid arguments or sizes.
    """
    y = _check_labels(labels)
    _check_num_clients(num_clients)
    if not alpha > 0 or not np.isfinite(alpha):
        raise DataError(f"inner_dirichlet: alpha must be a finite number > 0, got {alpha!r}")
    want = (
        client_sizes(y.size, num_clients, rng, min_size=0)
        if sizes is None
        else np.asarray(sizes, dtype=np.int64)
    )
    if want.shape != (num_clients,) or int(want.sum()) != y.size or (want.size and int(want.min()) < 0):
        raise DataError(
            f"inner_dirichlet: sizes must be {num_clients} non-negative integers summing to {y.size}, "
            f"got shape {want.shape} summing to {int(want.sum())}"
        )
    classes = np.unique(y)
    available = np.array([np.sum(y == c) for c in classes], dtype=np.int64)
    prior = available / available.sum()
    counts = np.zeros((num_clients, classes.size), dtype=np.int64)
    for client in range(num_clients):
        q = rng.dirichlet(alpha * prior)
        need = int(want[client])
        while need > 0:
            open_classes = available > 0
            p = q * open_classes
            if p.sum() <= 0:  # q puts no mass on what is left: fill from what is left
                p = available.astype(np.float64)
            take = np.minimum(rng.multinomial(need, p / p.sum()), available)
            counts[client] += take
            available -= take
            need -= int(take.sum())
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for j, cls in enumerate(classes):
        members = rng.permutation(np.flatnonzero(y == cls))
        for client, piece in enumerate(np.split(members, np.cumsum(counts[:, j])[:-1])):
            parts[client].append(piece)
    return [np.sort(np.concatenate(p)).astype(np.int64, copy=False) for p in parts]


def natural(groups: np.ndarray | torch.Tensor | list[Any]) -> tuple[list[np.ndarray], list[str]]:
    """One client per distinct value of ``groups`` (a writer, a speaker, a hospital id column).

    Returns:
        ``(indices, names)``: client ``i`` holds the examples whose group is the
        ``i``-th distinct value in sorted order; ``names[i]`` is that value as a string.

    Raises:
        DataError: if ``groups`` is not one-dimensional or is empty.
    """
    g = groups.numpy() if isinstance(groups, torch.Tensor) else np.asarray(groups)
    if g.ndim != 1 or g.size == 0:
        raise DataError(f"natural: groups must be a non-empty 1-D array, got shape {g.shape}")
    values, inverse = np.unique(g, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse, minlength=values.size))[:-1]
    return [p.astype(np.int64) for p in np.split(order, bounds)], [str(v) for v in values]


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


def _inner_dirichlet_scheme(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    alpha: float,
    size_distribution: str = "equal",
    min_size: int = 0,
    sigma: float = 1.0,
    rate: float = 0.1,
) -> list[np.ndarray]:
    sizes = client_sizes(
        labels.size,
        num_clients,
        rng,
        distribution=size_distribution,
        min_size=min_size,
        sigma=sigma,
        rate=rate,
    )
    return inner_dirichlet(labels, num_clients, rng, alpha=alpha, sizes=sizes)


def _sized_scheme(distribution: str) -> Partitioner:
    def scheme(
        labels: np.ndarray,
        num_clients: int,
        rng: np.random.Generator,
        *,
        min_size: int = 1,
        rate: float = 0.1,
    ) -> list[np.ndarray]:
        return sized(labels.size, num_clients, rng, distribution=distribution, min_size=min_size, rate=rate)

    return scheme


def _natural_scheme(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, *, groups: np.ndarray
) -> list[np.ndarray]:
    g = np.asarray(groups)
    if g.shape != labels.shape:
        raise DataError(f"natural: groups has shape {g.shape} but there are {labels.size} examples")
    parts, names = natural(g)
    if len(parts) != num_clients:
        raise DataError(
            f"natural: the id column has {len(parts)} distinct values ({', '.join(names[:5])}"
            f"{', ...' if len(names) > 5 else ''}), so num_clients must be {len(parts)}, got {num_clients}"
        )
    return parts


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
register_scheme("pathological", pathological)
register_scheme("inner_dirichlet", _inner_dirichlet_scheme)
register_scheme("linear", _sized_scheme("linear"))
register_scheme("square", _sized_scheme("square"))
register_scheme("exponential", _sized_scheme("exponential"))
register_scheme("natural", _natural_scheme)


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
