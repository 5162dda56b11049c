"""The safetensors writer of fedloom.core.serde against the safetensors library itself."""

from __future__ import annotations

import itertools
import json

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedloom.core.params import Params
from fedloom.core.serde import params_from_bytes, params_to_bytes, slots_from_bytes, slots_to_bytes


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
