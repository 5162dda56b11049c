"""The safetensors writer of fedloom.core.serde against the safetensors library itself."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedloom.core.errors import RunStateError
from fedloom.core.params import Params
from fedloom.core.serde import (
    data_all_finite,
    params_from_bytes,
    params_to_bytes,
    slots_from_bytes,
    slots_to_bytes,
)


def _mixed() -> Params:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    return Params(
        {
            "w": base,
            "view": base.t(),  # a non-contiguous view sharing w's storage
            "half": torch.randn(3, generator=g).half(),
            "bf": torch.randn(4, 2, generator=g).bfloat16(),
            "scalar": torch.tensor(2.5, dtype=torch.float64),
            "steps": torch.tensor([3, -1], dtype=torch.int64),
            "mask": torch.tensor([True, False, True]),
            "bytes": torch.arange(7, dtype=torch.uint8),
            "empty": torch.zeros(0, 3),
        }
    )


def test_the_library_reads_our_output_bit_exactly_in_our_key_order() -> None:
    p = _mixed()
    blob = params_to_bytes(p)
    n = int.from_bytes(blob[:8], "little")
    assert n % 8 == 0  # header padded: every buffer stays aligned
    header = json.loads(blob[8 : 8 + n])
    ends = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
    assert ends[0][0] == 0
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ends))  # no holes, no overlaps
    assert ends[-1][1] == len(blob) - 8 - n
    loaded = st_load(blob)
    for k, v in p.items():
        assert loaded[k].dtype == v.dtype, k
        assert loaded[k].shape == v.shape, k
        assert torch.equal(loaded[k], v), k
    back = params_from_bytes(blob)
    assert list(back) == list(p)
    assert back.equal(p)


def test_blobs_written_by_the_library_still_decode() -> None:
    # Checkpoints and state dirs of earlier versions were written by safetensors.torch.save.
    p = Params({k: v for k, v in _mixed().items() if k != "view"})  # the library refuses shared storage
    slots = {"params": p, "x.c": Params({"c": torch.ones(2)})}
    order = {s: list(q) for s, q in slots.items()}
    tensors = {f"{s}/{k}": v.contiguous() for s, q in slots.items() for k, v in q.items()}
    old = st_save(tensors, metadata={"fedloom.order": json.dumps(order)})
    back = slots_from_bytes(old)
    assert back["params"].equal(p)
    assert back["x.c"].equal(slots["x.c"])
    assert slots_from_bytes(slots_to_bytes(slots))["params"].equal(p)


def test_a_dtype_outside_our_table_goes_through_the_library() -> None:
    p = Params({"c": torch.tensor([1 + 2j, 3j], dtype=torch.complex64), "w": torch.ones(2)})
    assert params_from_bytes(params_to_bytes(p)).equal(p)


def test_our_reader_matches_the_library_on_its_output_and_reads_views() -> None:
    p = Params({k: v for k, v in _mixed().items() if k != "view"})
    tensors = {k: v.contiguous() for k, v in p.items()}
    lib = st_save(tensors, metadata={"fedloom.order": json.dumps(list(p))})
    framed = b"\x12\x05junk!" + lib + b"trailer"  # the blob inside a larger message
    view = memoryview(framed)[7 : 7 + len(lib)]
    back = params_from_bytes(view)  # type: ignore[arg-type]
    assert back.equal(p)
    for k, v in back.items():
        assert v.dtype == p[k].dtype, k
        assert v.shape == p[k].shape, k
    # The tensors own their memory: writable, and independent of the message's bytes.
    back["w"].add_(1.0)
    assert st_load(lib)["w"].equal(p["w"])


def _blob(header: dict[str, object], data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


@pytest.mark.parametrize(
    ("header", "data", "match"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "4 bytes for shape"),
        (
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]},
            },
            b"\0" * 6,
            "overlap or leave a hole",
        ),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "hole"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 12, "holds 12 bytes"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "not a list of sizes"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4, "not a byte range"),
        ({"a": {"dtype": 7, "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "not a type name"),
        ({"__metadata__": {"k": 1}}, b"", "strings to strings"),
        ({"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}, b"", "fedloom.order"),
    ],
)
def test_malformed_headers_are_refused_naming_the_problem(
    header: dict[str, object], data: bytes, match: str
) -> None:
    with pytest.raises(RunStateError, match=match):
        params_from_bytes(_blob(header, data))


def test_a_header_length_past_the_end_is_refused() -> None:
    with pytest.raises(RunStateError, match="overruns"):
        params_from_bytes((1000).to_bytes(8, "little") + b"{}")
    with pytest.raises(RunStateError, match="shorter than"):
        params_from_bytes(b"\x01\x02")


def test_an_odd_layout_from_another_writer_gets_aligned_tensors() -> None:
    # An F16 scalar first puts the F32 tensor at byte 2: it gets a buffer of its own.
    h = torch.tensor([1.5], dtype=torch.float16)
    f = torch.tensor([2.0, -3.0])
    header = {
        "__metadata__": {"fedloom.order": json.dumps(["h", "f"])},
        "h": {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]},
        "f": {"dtype": "F32", "shape": [2], "data_offsets": [2, 10]},
    }
    back = params_from_bytes(_blob(header, h.numpy().tobytes() + f.numpy().tobytes()))
    assert list(back) == ["h", "f"]
    assert back["h"].equal(h)
    assert back["f"].equal(f)
    assert back["f"].data_ptr() % 4 == 0


def test_decoded_tensors_own_their_storage() -> None:
    # One storage per tensor, as the library's reader gives: pickling one (Ray) carries its bytes only.
    back = params_from_bytes(params_to_bytes(_mixed()))
    ptrs = [v.untyped_storage().data_ptr() for v in back.values() if v.numel()]
    assert len(set(ptrs)) == len(ptrs)
    assert all(v.untyped_storage().nbytes() == v.numel() * v.element_size() for v in back.values())


def test_views_decode_equals_the_copy_and_shares_the_buffer() -> None:
    p = _mixed()
    buf = bytearray(params_to_bytes(p))
    copied = params_from_bytes(bytes(buf))
    viewed = slots_from_bytes(memoryview(buf), copy=False)[""]
    assert viewed.equal(copied)
    assert viewed.equal(p.map(lambda v: v.contiguous()))
    # a view, not a copy: the blob's bytes are the tensor's (the last 4 bytes of "w" set to 1.0)
    header = int.from_bytes(buf[:8], "little")
    entry = json.loads(buf[8 : 8 + header])["w"]
    end = 8 + header + entry["data_offsets"][1]
    buf[end - 4 : end] = torch.tensor([1.0]).numpy().tobytes()
    assert float(viewed["w"].reshape(-1)[-1]) == 1.0
    assert float(copied["w"].reshape(-1)[-1]) == float(p["w"].reshape(-1)[-1])


def test_a_cached_header_still_refuses_a_blob_whose_data_does_not_fit_it() -> None:
    blob = params_to_bytes(Params({"a": torch.ones(4), "b": torch.zeros(2)}))
    assert params_from_bytes(blob).equal(params_from_bytes(blob))  # the second decode hits the cache
    with pytest.raises(RunStateError, match="data area holds 20 bytes, the tensors 24"):
        params_from_bytes(blob[:-4])  # same header, short data: a different cache key
    with pytest.raises(RunStateError, match="data area holds 28 bytes, the tensors 24"):
        params_from_bytes(blob + b"\0" * 4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_data_all_finite_finds_a_bad_value_in_any_tensor(bad: float) -> None:
    clean = Params({"a": torch.ones(3, 2), "b": torch.arange(5.0), "c": torch.tensor(0.5)})
    assert data_all_finite(params_to_bytes(clean)) is True
    for name in clean:
        dirty = clean.map(lambda v: v.clone())
        dirty[name].reshape(-1)[-1] = bad
        assert data_all_finite(params_to_bytes(dirty)) is False, name
    # one pass needs one dtype: mixed tensors are left to the per-tensor check
    assert data_all_finite(params_to_bytes(_mixed())) is None
    assert data_all_finite(params_to_bytes(Params({"n": torch.arange(3)}))) is True
