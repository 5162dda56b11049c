"""Secure aggregation: SecAgg (Bonawitz et al. 2017, ePrint 2017/281) and SecAgg+ (Bell et al. 2020, ePrint 2020/704).

The server learns the sum of the clients' fixed-point-encoded updates and
nothing else; clients that drop out after sharing their keys do not stop it.

Layers, bottom up: :mod:`fixedpoint` (floats <-> Z_{2^bits}), :mod:`prg` (mask
expansion), :mod:`keys` (X25519, HKDF, AEAD), :mod:`shamir` (t-of-m sharing),
:mod:`graph` (complete / Harary graphs), :mod:`messages` (wire dataclasses),
:mod:`client` and :mod:`server` (the round state machines) and :mod:`simulate`
(everything in one process). Requires the ``secure`` extra (``cryptography``).
"""

from fedloom.secagg.errors import ProtocolViolation, SecAggAbort, SecAggError, ShareDecryptionError
from fedloom.secagg.fixedpoint import FixedPoint, decode_sum, encode, sum_error_bound
from fedloom.secagg.graph import Graph, complete_graph, default_threshold, harary_graph, secagg_plus_degree
from fedloom.secagg.messages import RoundParams
from fedloom.secagg.simulate import SecureSumResult, simulate_secure_sum

__all__ = [
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
]
