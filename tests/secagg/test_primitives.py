"""Shamir sharing, the mask PRG and the key/AEAD layer, tested alone."""

from __future__ import annotations

import itertools
import math
import os

import numpy as np
import pytest

from fedloom.secagg import keys, shamir
from fedloom.secagg.errors import ProtocolViolation, ShareDecryptionError
from fedloom.secagg.prg import expand_mask


def chi2_critical(df: int, z: float) -> float:
    """Upper chi-square quantile by Wilson-Hilferty (z = the normal quantile of the level)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2_top_byte(v: np.ndarray, bits: int) -> float:
    counts = np.bincount((v >> np.uint64(bits - 8)).astype(np.int64), minlength=256)
    expected = v.size / 256
    return float(np.sum((counts - expected) ** 2 / expected))


def test_shamir_any_t_of_m_recover_and_fewer_do_not() -> None:
    secret = os.urandom(32)
    points = [3, 8, 11, 20, 21]
    shares = shamir.split(secret, points, 3)
    for idx in itertools.combinations(range(5), 3):
        assert shamir.combine([points[i] for i in idx], [shares[i] for i in idx], 3) == secret
    with pytest.raises(ProtocolViolation):
        shamir.combine(points[:2], shares[:2], 3)


def test_shamir_threshold_one_is_the_secret_itself() -> None:
    secret = bytes(range(32))
    (share,) = shamir.split(secret, [5], 1)
    assert np.frombuffer(share, "<u4").tolist() == np.frombuffer(secret, "<u2").tolist()


def test_shamir_shares_below_threshold_look_random() -> None:
    # Two secrets with the same t-1 points: the shares are fresh each time (no deterministic leak).
    a = shamir.split(bytes(32), [1, 2, 3], 3)
    b = shamir.split(bytes(32), [1, 2, 3], 3)
    assert a[:2] != b[:2]


def test_prg_is_deterministic_in_range_and_seed_dependent() -> None:
    seed = bytes(range(32))
    a, b = expand_mask(seed, 1000, 20), expand_mask(seed, 1000, 20)
    assert np.array_equal(a, b)
    assert a.dtype == np.uint64
    assert int(a.max()) < 1 << 20
    assert not np.array_equal(a, expand_mask(bytes(31) + b"\x01", 1000, 20))
    assert np.array_equal(expand_mask(seed, 10, 32), expand_mask(seed, 20, 32)[:10])


@pytest.mark.parametrize("bits", [16, 32, 48])
def test_prg_output_is_uniform(bits: int) -> None:
    # Fixed seed -> deterministic test; level 0.001.
    seed = np.random.default_rng(1234).bytes(32)
    v = expand_mask(seed, 1 << 16, bits)
    assert chi2_top_byte(v, bits) < chi2_critical(255, 3.0902)


def test_key_agreement_and_mask_seed_are_symmetric() -> None:
    a, b = keys.generate_private_key(), keys.generate_private_key()
    ab = keys.agree(a, keys.public_bytes(b), peer=2)
    ba = keys.agree(b, keys.public_bytes(a), peer=1)
    assert ab == ba
    session = bytes(16)
    assert keys.derive_mask_seed(ab, session, 1, 2) == keys.derive_mask_seed(ba, session, 2, 1)
    assert keys.derive_share_key(ab, session, 1, 2) != keys.derive_share_key(ab, session, 2, 1)
    assert keys.derive_mask_seed(ab, bytes(15) + b"\x01", 1, 2) != keys.derive_mask_seed(ab, session, 1, 2)


def test_private_key_round_trip() -> None:
    k = keys.generate_private_key()
    assert keys.public_bytes(keys.private_from_bytes(keys.private_bytes(k))) == keys.public_bytes(k)


def test_bad_public_key_names_the_peer() -> None:
    with pytest.raises(ProtocolViolation, match="client 7"):
        keys.agree(keys.generate_private_key(), bytes(32), peer=7)  # low-order point


def test_aead_detects_tampering_and_misrouting() -> None:
    key, session = os.urandom(32), os.urandom(16)
    blob = keys.seal_share(key, session, 3, 5, b"share")
    assert keys.open_share(key, session, 3, 5, blob) == b"share"
    bad = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(ShareDecryptionError) as info:
        keys.open_share(key, session, 3, 5, bad)
    assert (info.value.sender, info.value.receiver) == (3, 5)
    with pytest.raises(ShareDecryptionError):
        keys.open_share(key, session, 4, 5, blob)  # relabelled sender
    with pytest.raises(ShareDecryptionError):
        keys.open_share(key, os.urandom(16), 3, 5, blob)  # replay into another round
