"""A name -> factory registry of aggregation rules, for configs and the CLI.

A factory takes the rule's options as keyword arguments and returns an
:data:`Aggregator`: a function with the signature of
:func:`~fedloom.algorithms.aggregate.weighted_mean`, so it can replace it::

    agg = make_aggregator("trimmed_mean", beta=0.1)
    delta, total = agg(updates)

:func:`register` refuses a name that is already taken (as Opacus's accountant
registry does), so two modules cannot silently shadow each other.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from fedloom.aggregators.coordinatewise import coordinate_median, trimmed_mean
from fedloom.aggregators.geometric import geometric_median, norm_bounded_mean
from fedloom.aggregators.krum import bulyan, krum, multi_krum
from fedloom.algorithms.aggregate import Aggregator, weighted_mean
from fedloom.core.errors import ConfigError
from fedloom.core.params import Params

__all__ = ["AGGREGATORS", "Aggregator", "AggregatorFactory", "make_aggregator", "register"]

AggregatorFactory = Callable[..., Aggregator]

AGGREGATORS: dict[str, AggregatorFactory] = {}


def register(name: str, factory: AggregatorFactory) -> None:
    """Add ``factory`` under ``name``; raises ``ValueError`` if the name is taken."""
    if name in AGGREGATORS:
        raise ValueError(f"an aggregator named {name!r} is already registered")
    AGGREGATORS[name] = factory


def make_aggregator(name: str, **options: Any) -> Aggregator:
    """The aggregator ``name`` with ``options`` bound; :class:`ConfigError` for an unknown name or option."""
    factory = AGGREGATORS.get(name)
    if factory is None:
        raise ConfigError([f"aggregator {name!r} is unknown; expected one of {sorted(AGGREGATORS)}"])
    try:
        return factory(**options)
    except TypeError as exc:
        raise ConfigError([f"aggregator {name!r}: bad options {options}: {exc}"]) from exc


def _bind(fn: Callable[..., tuple[Params, float]]) -> AggregatorFactory:
    def factory(**options: Any) -> Aggregator:
        inspect.signature(fn).bind([], **options)  # a misspelt or missing option fails now, not in round 1
        # With no options the rule itself, so that code recognising a rule by identity (the plain
        # weighted mean, which executors may sum as updates arrive: fedloom.sim.reduce) sees it.
        return functools.partial(fn, **options) if options else fn

    return factory


register("mean", _bind(weighted_mean))
register("median", _bind(coordinate_median))
register("trimmed_mean", _bind(trimmed_mean))
register("krum", _bind(krum))
register("multi_krum", _bind(multi_krum))
register("bulyan", _bind(bulyan))
register("geometric_median", _bind(geometric_median))
register("norm_bound", _bind(norm_bounded_mean))
