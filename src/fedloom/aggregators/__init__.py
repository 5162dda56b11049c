"""Byzantine-robust aggregation rules with the signature of ``weighted_mean``, and their registry."""

from fedloom.aggregators.coordinatewise import coordinate_median, trimmed_mean
from fedloom.aggregators.geometric import geometric_median, norm_bounded_mean
from fedloom.aggregators.krum import bulyan, krum, multi_krum
from fedloom.aggregators.registry import AGGREGATORS, Aggregator, AggregatorFactory, make_aggregator, register

__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "AggregatorFactory",
    "bulyan",
    "coordinate_median",
    "geometric_median",
    "krum",
    "make_aggregator",
    "multi_krum",
    "norm_bounded_mean",
    "register",
    "trimmed_mean",
]
