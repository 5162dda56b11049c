"""Chunked parameter transfer and the encoding of one client update (no grpc here).

A broadcast is ``slots_to_bytes({"params": ..., "x.<extra>": ...})`` (with
``compression.downlink`` the params packed and a ``"dl"`` slot naming them); an
update is ``slots_to_bytes({"delta": ..., "x.<extra>": ...})`` plus a JSON header
with the scalars (weight, example and step counts, metrics). A compressed update
(a codec stage, :mod:`fedloom.transforms.compression`) has an empty ``delta``
and its packed bytes (b-bit codes and scales, top-k values and indices) in the
``x.codec`` slot: those bytes are what travels, and the server unpacks them. Both are safetensors blobs:
raw little-endian tensor buffers behind a small JSON header, never pickle. The blob
is cut into chunks of at most ``chunk_bytes`` so a model larger than gRPC's message
limit still travels.

Under secure aggregation the SecAgg round messages (:mod:`fedloom.secagg.messages`,
dataclasses of ints, bytes and tuples) travel as JSON with base64 bytes
(:func:`encode_secagg` / :func:`decode_secagg`); they are not chunked, so the
masked vector must fit ``deploy.max_message_bytes``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import xxhash
from google.protobuf.message import DecodeError

from fedloom.algorithms.api import Broadcast, ClientUpdate
from fedloom.core.errors import RunStateError, UpdateError
from fedloom.core.params import Params
from fedloom.core.serde import slots_from_bytes, slots_to_bytes, slots_to_pieces
from fedloom.net.proto import fedloom_pb2 as pb
from fedloom.transforms.compression.downlink import (
    DOWNLINK_SLOT,
    EXTRA_PREFIX,
    Downlink,
    broadcast_slots,
    expand_broadcast,
)
from fedloom.transforms.compression.patch import PATCH_SLOT, apply_patch, make_patch

__all__ = [
    "EMPTY_PATCH",
    "EMPTY_PATCH_XXH3",
    "UpdateMeta",
    "chunk_size_for",
    "decode_broadcast",
    "decode_chunk",
    "decode_secagg",
    "decode_update",
    "encode_broadcast",
    "encode_bytes_field",
    "encode_chunk",
    "encode_patch",
    "encode_secagg",
    "encode_update",
    "fingerprint",
    "iter_chunks",
    "model_digest",
    "patched_broadcast",
    "pieces_size",
    "split_bytes_field",
    "update_pieces",
]

_EXTRA = EXTRA_PREFIX
# Room left in each gRPC message for the protobuf envelope and the upload header.
_ENVELOPE = 2048


def fingerprint(data: bytes | memoryview) -> int:
    """XXH3-64 of ``data``: the check of a download and of a pending file (damage, not an adversary).

    About 12 times faster than zlib's CRC-32 here (0.022 against 0.26 ms for the 2NN's 0.8 MB),
    and 64 bits wide; integrity against an attacker is TLS's job.
    """
    return int(xxhash.xxh3_64_intdigest(data))


def model_digest(blob: bytes | memoryview) -> str:
    """The name of a broadcast model: XXH3-128 of its blob, 32 hex digits.

    A client's update repeats the name of the model it trained on, so an update trained on
    another round's model is refused. The server chose the content it names, and no client can
    choose it, so a cryptographic hash buys nothing here: SHA-256 took 0.45 ms per 2NN broadcast,
    on the serial path between one round's aggregation and the next round's opening; this takes
    0.013 ms.
    """
    return str(xxhash.xxh3_128_hexdigest(blob))


def chunk_size_for(max_message_bytes: int) -> int:
    """The largest chunk payload that fits a gRPC message of ``max_message_bytes`` (at most 1 MiB)."""
    return max(1024, min(1 << 20, max_message_bytes - _ENVELOPE))


def iter_chunks(blob: bytes, chunk_bytes: int) -> Iterator[bytes]:
    """``blob`` cut into consecutive pieces of at most ``chunk_bytes`` (one empty piece if empty)."""
    view = memoryview(blob)
    n = max(1, math.ceil(len(blob) / chunk_bytes))
    for i in range(n):
        yield bytes(view[i * chunk_bytes : (i + 1) * chunk_bytes])


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def encode_chunk(
    data: bytes | memoryview | Sequence[bytes | memoryview], header: pb.UpdateHeader | None = None
) -> bytes:
    """The protobuf encoding of ``Chunk(header=header, data=data)``, built with one copy of ``data``.

    ``data`` may be given in pieces (:func:`update_pieces`): they are joined with the envelope
    in the same single copy. Byte for byte what ``pb.Chunk(...).SerializeToString()`` gives;
    protobuf's own encoder copies an 0.8 MB ``data`` field twice (into the message, then into
    the output) and is several times slower. Used for the unary Push request.
    """
    pieces = [data] if isinstance(data, bytes | memoryview) else list(data)
    size = pieces_size(pieces)
    parts: list[bytes | memoryview] = []
    if header is not None:
        h = header.SerializeToString()
        parts += [b"\x0a", _varint(len(h)), h]
    if size:
        parts += [b"\x12", _varint(size), *pieces]
    return b"".join(parts)


def pieces_size(pieces: Sequence[bytes | memoryview]) -> int:
    """The number of bytes ``b"".join(pieces)`` would hold."""
    return sum(_nbytes(p) for p in pieces)


def _nbytes(piece: bytes | memoryview) -> int:
    return piece.nbytes if isinstance(piece, memoryview) else len(piece)


def encode_bytes_field(number: int, data: bytes) -> bytes:
    """The protobuf encoding of field ``number`` (``bytes``) holding ``data``, with one copy of ``data``.

    Protobuf messages concatenate: ``small.SerializeToString() + encode_bytes_field(9, blob)``
    is the encoding of ``small`` with field 9 set to ``blob``.
    """
    return b"".join((_varint(number << 3 | 2), _varint(len(data)), data))


def split_bytes_field(raw: bytes, number: int) -> tuple[bytes, memoryview | None]:
    """``(raw without field number, that field's value or None)``: the inverse of :func:`encode_bytes_field`.

    Walks the top-level fields of an encoded message; the value of the (last) occurrence of
    ``number`` is returned as a view into ``raw`` (no copy), the other fields as an encoded
    message for protobuf's parser. Raises :class:`UpdateError` on a malformed message.
    """
    rest: list[bytes] = []
    value: memoryview | None = None
    pos, end = 0, len(raw)
    while pos < end:
        start = pos
        pos, key = _read_varint(raw, pos)
        kind = key & 7
        if kind == 0:
            pos, _ = _read_varint(raw, pos)
        elif kind in (1, 5):
            pos += 8 if kind == 1 else 4
        elif kind == 2:
            pos, n = _read_varint(raw, pos)
            if key >> 3 == number:
                if pos + n > end:
                    raise UpdateError(f"field {number} of {n} bytes overruns the {end}-byte message")
                value = memoryview(raw)[pos : pos + n]
                pos += n
                continue
            pos += n
        else:
            raise UpdateError(f"message uses protobuf wire type {kind} (groups), which fedloom never sends")
        if pos > end:
            raise UpdateError(f"a field overruns the {end}-byte message")
        rest.append(raw[start:pos])
    return b"".join(rest), value


def decode_chunk(raw: bytes) -> tuple[pb.UpdateHeader | None, bytes | memoryview]:
    """``(header or None, data)`` of an encoded ``Chunk``; raises :class:`UpdateError` if it does not parse.

    The two fields are located by their tags and ``data`` is a view into ``raw`` (no copy);
    anything but the plain layout (unknown fields, odd tags) goes through protobuf's parser.
    """
    header: pb.UpdateHeader | None = None
    data: bytes | memoryview = b""
    pos, end = 0, len(raw)
    try:
        while pos < end:
            tag = raw[pos]
            if tag not in (0x0A, 0x12):
                return _decode_chunk_slow(raw)
            pos, n = _read_varint(raw, pos + 1)
            if pos + n > end:
                raise UpdateError(f"chunk field of {n} bytes overruns the {end}-byte message")
            if tag == 0x0A:
                header = pb.UpdateHeader.FromString(raw[pos : pos + n])
            else:
                data = memoryview(raw)[pos : pos + n]
            pos += n
    except DecodeError as exc:
        raise UpdateError(f"upload message does not parse: {exc}") from None
    return header, data


def _read_varint(raw: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(raw) or shift > 63:
            raise UpdateError("upload message has a truncated or overlong length field")
        b = raw[pos]
        value |= (b & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not b & 0x80:
            return pos, value


def _decode_chunk_slow(raw: bytes) -> tuple[pb.UpdateHeader | None, bytes]:
    try:
        msg = pb.Chunk.FromString(raw)
    except DecodeError as exc:
        raise UpdateError(f"upload message does not parse: {exc}") from None
    return (msg.header if msg.HasField("header") else None), msg.data


def encode_broadcast(b: Broadcast, downlink: Downlink = "none") -> bytes:
    """The broadcast blob; ``downlink`` packs the model's floating tensors (see
    :mod:`fedloom.transforms.compression.downlink`), naming them in a ``dl`` slot."""
    return slots_to_bytes(broadcast_slots(b, downlink))


#: The patch of a broadcast against itself (for a client that already holds the round's model).
EMPTY_PATCH = slots_to_bytes({PATCH_SLOT: Params({})})
EMPTY_PATCH_XXH3 = fingerprint(EMPTY_PATCH)


def encode_patch(blob: bytes | memoryview, held: bytes | memoryview) -> bytes | None:
    """The broadcast ``blob`` as a patch against the earlier broadcast ``held`` (see
    :mod:`fedloom.transforms.compression.patch`), or ``None`` where the patch would not be smaller
    than ``blob`` itself or the two do not hold the same tensors."""
    patch = make_patch(slots_from_bytes(blob), slots_from_bytes(held))
    if patch is None:
        return None
    out = slots_to_bytes({PATCH_SLOT: patch})
    return out if len(out) < len(blob) else None


def patched_broadcast(held: bytes | memoryview, patch: bytes | memoryview, digest: str, round: int) -> bytes:
    """The broadcast blob that ``patch`` makes of the ``held`` one, checked to be the model named
    ``digest`` (:func:`model_digest`): bit for bit the blob the server would have sent whole.

    Raises :class:`UpdateError` if the patch does not parse, does not fit the held broadcast, or
    rebuilds another model.
    """
    try:
        slots = slots_from_bytes(patch)
    except RunStateError as exc:
        raise UpdateError(f"broadcast patch of round {round} does not parse: {exc}") from exc
    if list(slots) != [PATCH_SLOT]:
        raise UpdateError(f"broadcast patch of round {round} has slots {sorted(slots)}, not [{PATCH_SLOT!r}]")
    blob = slots_to_bytes(apply_patch(slots_from_bytes(held), slots[PATCH_SLOT]))
    if model_digest(blob) != digest:
        raise UpdateError(f"round {round}: the patched broadcast is not the model named {digest[:12]}")
    return blob


def decode_broadcast(blob: bytes | memoryview, round: int, downlink: Downlink = "none") -> Broadcast:
    """Inverse of :func:`encode_broadcast` with the same ``downlink`` (packed tensors widened to float32)."""
    try:
        slots = slots_from_bytes(blob)
    except RunStateError as exc:
        raise UpdateError(f"broadcast of round {round} does not parse: {exc}") from exc
    if "params" not in slots:
        raise UpdateError(f"broadcast of round {round} has no 'params' slot")
    extras = {k[len(_EXTRA) :]: v for k, v in slots.items() if k.startswith(_EXTRA)}
    b = Broadcast(round=round, params=slots["params"], extras=extras)
    return expand_broadcast(b, slots.get(DOWNLINK_SLOT, Params({})), downlink)


@dataclass(frozen=True)
class UpdateMeta:
    """The scalar part of an update, sent as JSON in the first upload chunk."""

    weight: float
    num_examples: int
    num_steps: int
    metrics: Mapping[str, float]
    compute_s: float = 0.0

    def to_json(self) -> str:
        return json.dumps(
            {
                "weight": self.weight,
                "num_examples": self.num_examples,
                "num_steps": self.num_steps,
                "metrics": dict(self.metrics),
                "compute_s": self.compute_s,
            }
        )

    @staticmethod
    def from_json(text: str) -> UpdateMeta:
        """Parse and check the header; raises :class:`UpdateError` naming the bad field.

        Whatever the text holds (an integer of thousands of digits, nesting deeper than the parser's
        recursion, numbers beyond a float's range), the only exception is :class:`UpdateError`.
        """
        try:
            raw: Any = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UpdateError(f"update header is not JSON: {exc}") from None
        except (ValueError, RecursionError) as exc:
            raise UpdateError(f"update header does not parse: {type(exc).__name__}: {exc}"[:300]) from None
        if not isinstance(raw, dict):
            raise UpdateError("update header must be a JSON object")
        problems: list[str] = []
        weight = _finite_float(raw.get("weight"))
        if weight is None or weight <= 0:
            problems.append(f"weight = {_short(raw.get('weight'))}, expected a finite number > 0")
        for key in ("num_examples", "num_steps"):
            v = raw.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v >= 2**63:
                problems.append(f"{key} = {_short(v)}, expected an integer in [0, 2**63)")
        metrics = raw.get("metrics", {})
        values = {k: _finite_float(v) for k, v in metrics.items()} if isinstance(metrics, dict) else {}
        if not isinstance(metrics, dict) or any(v is None for v in values.values()):
            problems.append("metrics must map names to finite numbers")
        compute = _finite_float(raw.get("compute_s", 0.0))
        if compute is None:
            problems.append(f"compute_s = {_short(raw.get('compute_s'))}, expected a finite number")
        if problems:
            raise UpdateError("bad update header: " + "; ".join(problems))
        return UpdateMeta(
            weight=float(weight),  # type: ignore[arg-type]
            num_examples=int(raw["num_examples"]),
            num_steps=int(raw["num_steps"]),
            metrics={str(k): float(v) for k, v in values.items()},  # type: ignore[arg-type]
            compute_s=float(compute),  # type: ignore[arg-type]
        )


def _finite_float(v: object) -> float | None:
    """``v`` as a finite float, or ``None`` (not a number, a bool, NaN, infinite, or beyond a float)."""
    if not isinstance(v, int | float) or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def _short(v: object) -> str:
    """``repr(v)`` cut to 60 characters: a reason never echoes a long value back."""
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 64:
        return f"an integer of {v.bit_length()} bits"
    text = repr(v)
    return text if len(text) <= 60 else text[:60] + "..."


def encode_update(update: ClientUpdate, *, compute_s: float = 0.0) -> tuple[str, bytes]:
    """The header JSON and tensor blob of ``update`` (its ``client_state`` stays on the client)."""
    meta, pieces = update_pieces(update, compute_s=compute_s)
    return meta, b"".join(pieces)


def update_pieces(update: ClientUpdate, *, compute_s: float = 0.0) -> tuple[str, list[bytes | memoryview]]:
    """:func:`encode_update` with the blob not yet joined: the header JSON and the blob's pieces.

    For :func:`encode_chunk`, which joins them with the message envelope in one copy.
    """
    slots: dict[str, Params] = {"delta": update.delta}
    slots.update({_EXTRA + k: v for k, v in update.extras.items()})
    meta = UpdateMeta(
        weight=update.weight,
        num_examples=update.num_examples,
        num_steps=update.num_steps,
        metrics=update.metrics,
        compute_s=compute_s,
    )
    return meta.to_json(), slots_to_pieces(slots)


def decode_update(
    client_id: int, meta_json: str, blob: bytes | memoryview, *, copy: bool = True
) -> tuple[ClientUpdate, float]:
    """Rebuild a :class:`ClientUpdate` and the client's reported compute seconds.

    ``copy=False``: the tensors are views of ``blob`` (writable; see :func:`slots_from_bytes`).

    Raises :class:`UpdateError` when the header or the blob does not parse; shape
    and value checks are the coordinator's job.
    """
    meta = UpdateMeta.from_json(meta_json)
    try:
        slots = slots_from_bytes(blob, copy=copy)
    except (RunStateError, ValueError, KeyError, TypeError) as exc:
        raise UpdateError(f"update blob does not parse: {exc}") from None
    except Exception as exc:  # safetensors raises its own error type on corrupt buffers
        raise UpdateError(f"update blob does not parse: {type(exc).__name__}: {exc}") from None
    if "delta" not in slots:
        raise UpdateError(f"update blob has slots {sorted(slots)}, expected a 'delta' slot")
    extras = {k[len(_EXTRA) :]: v for k, v in slots.items() if k.startswith(_EXTRA)}
    unknown = sorted(k for k in slots if k != "delta" and not k.startswith(_EXTRA))
    if unknown:
        raise UpdateError(f"update blob has unexpected slots {unknown}")
    update = ClientUpdate(
        client_id=client_id,
        delta=slots["delta"],
        weight=meta.weight,
        num_examples=meta.num_examples,
        num_steps=meta.num_steps,
        metrics=meta.metrics,
        extras=extras,
    )
    return update, meta.compute_s


_M = TypeVar("_M")


def _secagg_types() -> dict[str, type]:
    # Imported here: fedloom.secagg needs the optional 'secure' extra (cryptography).
    from fedloom.secagg import messages as m

    kinds = (
        m.AdvertiseKeys,
        m.Roster,
        m.ShareKeys,
        m.ShareInbox,
        m.MaskedInput,
        m.UnmaskRequest,
        m.UnmaskResponse,
    )
    return {t.__name__: t for t in kinds}


def _to_plain(x: object) -> Any:
    if isinstance(x, bytes):
        return base64.b64encode(x).decode("ascii")
    if isinstance(x, int) and not isinstance(x, bool):
        return x
    if isinstance(x, tuple):
        return [_to_plain(v) for v in x]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _to_plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    raise TypeError(f"not a secure-aggregation message part: {type(x).__name__}")


def _from_plain(tp: Any, v: Any, where: str) -> Any:
    if tp is bytes:
        if not isinstance(v, str):
            raise UpdateError(f"{where}: expected base64 text")
        try:
            return base64.b64decode(v, validate=True)
        except binascii.Error:
            raise UpdateError(f"{where}: invalid base64") from None
    if tp is int:
        if not isinstance(v, int) or isinstance(v, bool):
            raise UpdateError(f"{where}: expected an integer, got {type(v).__name__}")
        return v
    if typing.get_origin(tp) is tuple:
        if not isinstance(v, list):
            raise UpdateError(f"{where}: expected a list")
        elem = typing.get_args(tp)[0]
        return tuple(_from_plain(elem, e, f"{where}[{i}]") for i, e in enumerate(v))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        names = [f.name for f in dataclasses.fields(tp)]
        if not isinstance(v, dict) or sorted(v) != sorted(names):
            raise UpdateError(f"{where}: expected the fields {names} of {tp.__name__}")
        return tp(**{n: _from_plain(hints[n], v[n], f"{where}.{n}") for n in names})
    raise TypeError(f"unsupported message field type {tp!r}")


def encode_secagg(message: object) -> bytes:
    """One SecAgg round message as bytes (JSON, bytes fields base64); inverse of :func:`decode_secagg`."""
    name = type(message).__name__
    if _secagg_types().get(name) is not type(message):
        raise TypeError(f"not a secure-aggregation message: {name}")
    return json.dumps({"type": name, "body": _to_plain(message)}, separators=(",", ":")).encode()


def decode_secagg(data: bytes, kind: type[_M]) -> _M:
    """The ``kind`` message in ``data``; raises :class:`UpdateError` if it is anything else or malformed."""
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UpdateError(f"secure-aggregation message is not JSON: {exc}") from None
    if kind not in _secagg_types().values():
        raise TypeError(f"not a secure-aggregation message type: {kind!r}")
    if not isinstance(raw, dict) or raw.get("type") != kind.__name__ or "body" not in raw:
        raise UpdateError(f"expected a {kind.__name__} message")
    out = _from_plain(kind, raw["body"], kind.__name__)
    if not isinstance(out, kind):  # pragma: no cover - _from_plain builds ``kind``
        raise UpdateError(f"expected a {kind.__name__} message")
    return out
