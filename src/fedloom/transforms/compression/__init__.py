"""Compression of updates and broadcasts: codecs as pipeline stages (see docs/compression.md).

:class:`HalfCast` (float16/bfloat16), :class:`Qsgd` (stochastic b-bit
quantisation), :class:`Sparsify` (top-k / random-k with error feedback);
:mod:`~fedloom.transforms.compression.downlink` for the broadcast and
:mod:`~fedloom.transforms.compression.ring` for quantisation into the
secure-aggregation ring.
"""

from fedloom.transforms.compression.cast import HalfCast
from fedloom.transforms.compression.qsgd import Qsgd
from fedloom.transforms.compression.sparsify import Sparsify

__all__ = ["HalfCast", "Qsgd", "Sparsify"]
