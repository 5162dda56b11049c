"""IDX parsing on small hand-built files (no checksums involved)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from fedloom.core.errors import DataError
from fedloom.data import parse_idx, read_idx


def idx_bytes(arr: np.ndarray, code: int, big_endian_dtype: str) -> bytes:
    """Build an IDX file by the spec: 0x0000, type code, ndim, big-endian uint32 dims, big-endian data."""
    header = struct.pack(">HBB", 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(big_endian_dtype).tobytes()


IMAGES = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)


@pytest.mark.parametrize("name", ["train-images-idx3-ubyte", "train-images.idx3-ubyte"])
def test_raw_and_gzip_give_the_same_array(tmp_path: Path, name: str) -> None:
    data = idx_bytes(IMAGES, 0x08, "u1")
    (tmp_path / name).write_bytes(data)
    (tmp_path / f"{name}.gz").write_bytes(gzip.compress(data))
    raw, gz = read_idx(tmp_path / name), read_idx(tmp_path / f"{name}.gz")
    assert raw.dtype == np.uint8
    assert np.array_equal(raw, IMAGES)
    assert np.array_equal(gz, IMAGES)
    raw[0, 0, 0] = 200  # result is writable and owns its memory


@pytest.mark.parametrize(
    ("code", "be", "values"),
    [
        (0x09, ">i1", np.array([-3, 5], dtype=np.int8)),
        (0x0B, ">i2", np.array([-300, 1000], dtype=np.int16)),
        (0x0C, ">i4", np.array([-(2**30), 7], dtype=np.int32)),
        (0x0D, ">f4", np.array([1.5, -2.25], dtype=np.float32)),
        (0x0E, ">f8", np.array([1e300, -0.5], dtype=np.float64)),
    ],
)
def test_big_endian_types_decode_to_native(code: int, be: str, values: np.ndarray) -> None:
    out = parse_idx(idx_bytes(values, code, be))
    assert out.dtype.isnative
    assert np.array_equal(out, values)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00\x00", "only 2 bytes"),
        (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00", "not an IDX file"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "not an IDX file"),
        (b"\x00\x00\x08\x00", "0 dimensions"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "truncated IDX header"),
        (idx_bytes(IMAGES, 0x08, "u1")[:-1], "truncated or corrupt"),
        (idx_bytes(IMAGES, 0x08, "u1") + b"\x00", "truncated or corrupt"),
    ],
)
def test_malformed_files_raise(data: bytes, message: str) -> None:
    with pytest.raises(DataError, match=message):
        parse_idx(data, name="bad.idx")


def test_bad_gzip_raises_data_error(tmp_path: Path) -> None:
    path = tmp_path / "x-idx1-ubyte.gz"
    path.write_bytes(b"definitely not gzip")
    with pytest.raises(DataError, match="cannot read"):
        read_idx(path)


def test_missing_file_raises_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read"):
        read_idx(tmp_path / "nope")
