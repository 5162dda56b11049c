"""Random generators derived from (seed, round, client, purpose).

No fedloom code draws from a global random state. Every draw takes a generator
made here from the experiment seed and the coordinates of the draw, so a result
does not depend on worker count, scheduling or the order clients are trained in
(the FedJAX/pfl practice of seeding by round and by user, not by worker).

The derivation hashes the coordinates with BLAKE2b into a 64-bit seed; distinct
coordinates give statistically independent streams.
"""

from __future__ import annotations

import hashlib
import secrets
import struct

import numpy as np
import torch

__all__ = ["derive_seed", "noise_rng", "numpy_rng", "torch_rng"]

_NO_CLIENT = -1


def derive_seed(seed: int, purpose: str, *, round: int = -1, client: int = _NO_CLIENT) -> int:
    """Return a 63-bit seed for the stream named by ``(seed, round, client, purpose)``.

    ``round`` and ``client`` default to -1, meaning "not round/client specific"
    (e.g. the partition of the data, or the initial model).
    """
    h = hashlib.blake2b(digest_size=8, person=b"fedloom-rng-v1")
    h.update(struct.pack("<qqq", seed, round, client))
    h.update(purpose.encode("utf-8"))
    return int.from_bytes(h.digest(), "little") >> 1


def numpy_rng(seed: int, purpose: str, *, round: int = -1, client: int = _NO_CLIENT) -> np.random.Generator:
    """A NumPy generator for the given coordinates (see :func:`derive_seed`)."""
    return np.random.Generator(np.random.PCG64(derive_seed(seed, purpose, round=round, client=client)))


def torch_rng(seed: int, purpose: str, *, round: int = -1, client: int = _NO_CLIENT) -> torch.Generator:
    """A CPU torch generator for the given coordinates (see :func:`derive_seed`)."""
    g = torch.Generator()
    g.manual_seed(derive_seed(seed, purpose, round=round, client=client))
    return g


def noise_rng(
    seed: int, purpose: str, *, round: int = -1, client: int = _NO_CLIENT, secure: bool = False
) -> torch.Generator:
    """A generator for privacy noise.

    In simulation (``secure=False``) it is :func:`torch_rng`, so runs are
    reproducible. In deployment (``secure=True``) it is seeded from the operating
    system's CSPRNG: noise derived from a known seed could be subtracted by anyone
    who knows the seed, voiding the DP guarantee.
    """
    if not secure:
        return torch_rng(seed, purpose, round=round, client=client)
    g = torch.Generator()
    g.manual_seed(secrets.randbits(63))
    return g
