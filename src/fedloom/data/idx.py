"""The IDX file format (LeCun's format for MNIST), read without trusting the file.

Layout (all integers big-endian)::

    offset 0   2 bytes   zero
    offset 2   1 byte    element type: 0x08 u8, 0x09 i8, 0x0B i16, 0x0C i32, 0x0D f32, 0x0E f64
    offset 3   1 byte    number of dimensions d >= 1
    offset 4   4*d bytes size of each dimension (uint32)
    then       prod(sizes) elements, row-major

A file is accepted only if its length is exactly header + data; anything else
raises :class:`~fedloom.core.errors.DataError`. Files ending in ``.gz`` are
gunzipped first. Checksums are not this module's business (see
:mod:`fedloom.data.mnist`).
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from fedloom.core.errors import DataError

__all__ = ["parse_idx", "read_bytes", "read_idx"]

_DTYPES: dict[int, np.dtype[np.generic]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped when the name ends in ``.gz``.

    Raises:
        DataError: if the file cannot be read or is not valid gzip.
    """
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if path.name.endswith(".gz") else raw
    except (OSError, EOFError, zlib.error) as exc:
        # gzip.BadGzipFile is an OSError.
        raise DataError(f"cannot read {path}: {exc}") from exc


def parse_idx(data: bytes, *, name: str = "<bytes>") -> np.ndarray:
    """Decode IDX bytes into a native-endian array of the declared type and shape.

    Args:
        data: the whole (decompressed) file.
        name: how to refer to the data in error messages (usually the path).

    Returns:
        A new, writable array (the bytes are copied once).

    Raises:
        DataError: on a bad magic number, unknown type code, zero dimensions, or
            a length that does not match the header.
    """
    if len(data) < 4:
        raise DataError(f"{name}: not an IDX file (only {len(data)} bytes, a header needs at least 4)")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or code not in _DTYPES:
        raise DataError(
            f"{name}: not an IDX file (magic bytes {data[:4].hex()}; expected 0000 then a type code in "
            f"{sorted(hex(c) for c in _DTYPES)} then the number of dimensions)"
        )
    if ndim == 0:
        raise DataError(f"{name}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name}: truncated IDX header ({len(data)} bytes, {ndim} dimensions need {header})")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _DTYPES[code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise DataError(
            f"{name}: IDX header declares shape {shape} of {dtype} ({expected} bytes in all) but the data is "
            f"{len(data)} bytes; the file is truncated or corrupt"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    native = dtype.newbyteorder("=")
    # Always a copy: writable (torch.from_numpy-safe) and independent of ``data``.
    return arr.copy() if native == dtype else arr.astype(native)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (raw or ``.gz``) without checksum verification. See :func:`parse_idx`."""
    p = Path(path)
    return parse_idx(read_bytes(p), name=str(p))


def encode_idx_uint8(array: np.ndarray) -> bytes:
    """Encode a uint8 array as IDX bytes (magic ``0x0000 08 ndim``, big-endian dims, raw data).

    The inverse of :func:`parse_idx` for unsigned-byte data (all of MNIST).
    """
    if array.dtype != np.uint8:
        raise DataError(f"encode_idx_uint8 needs a uint8 array, got {array.dtype}")
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array).tobytes()
