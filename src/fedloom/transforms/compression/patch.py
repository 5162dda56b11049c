"""Downlink patches: a client that holds the previous broadcast receives only what changed.

A broadcast is a set of named tensors in slots (the model, the downlink's scales, the
algorithm's extras; see :func:`fedloom.net.wire.encode_broadcast`). A patch against an earlier
broadcast with the same tensors lists, per tensor, the positions whose bits changed and the new
values there, or the whole tensor where that is smaller. Applying it to the earlier broadcast
gives the new one exactly, bit for bit, whatever its encoding (float32, a float16/bfloat16 cast,
q8 codes): positions are compared as raw bits, so a NaN, a signed zero or a rounded code is
carried as it is. Nothing is approximated, so the clients train from the same model as without
patches, and the simulation needs no patch to reproduce a deployed run.

When is it smaller? A changed coordinate costs its value and a 4-byte position, so a patch wins
when fewer than ``itemsize / (itemsize + 4)`` of a tensor's coordinates change: under half for
float32, a third for float16, a fifth for q8 codes. That is the case when the round's aggregate is
sparse (few clients sending top-k updates), when parts of the model are frozen (a fine-tuned
head, adapters), or when updates are small against a q8 scale's step, late in training. With
dense float32 updates every coordinate changes and the full broadcast is sent instead.

Layout: one slot, ``patch``, whose tensors are, in the broadcast's order, for each tensor
``<slot>/<name>`` that changed either ``<slot>/<name>/=`` (the whole tensor) or
``<slot>/<name>/i`` (int32 positions into the flattened tensor, strictly increasing) followed by
``<slot>/<name>/v`` (the values there, in the tensor's dtype). A tensor that did not change is
not named (its entry would cost more header than the tensor's news).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedloom.core.errors import UpdateError
from fedloom.core.params import Params
from fedloom.core.serde import slots_to_bytes

__all__ = ["PATCH_SLOT", "apply_patch", "make_patch", "patch_blob_size"]

PATCH_SLOT = "patch"
_POSITION_BYTES = 4
_MAX_POSITION = 2**31 - 1  # positions are int32: a larger tensor is sent whole
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` flattened, as integers of its width (bit patterns compare exactly, NaN included)."""
    flat = t.detach().contiguous().reshape(-1)
    if t.dtype == torch.bool:
        return flat.to(torch.uint8)
    return flat.view(_BITS[t.element_size()]) if t.is_floating_point() else flat


def make_patch(new: Mapping[str, Params], old: Mapping[str, Params]) -> Params | None:
    """The patch that turns ``old`` into ``new`` (see the module docstring), or ``None`` when the two
    do not hold the same tensors (names, order, shapes, dtypes) and so cannot be patched."""
    if list(new) != list(old):
        return None
    out: dict[str, torch.Tensor] = {}
    for slot, tensors in new.items():
        before = old[slot]
        if list(tensors) != list(before):
            return None
        for name, v in tensors.items():
            w = before[name]
            if v.shape != w.shape or v.dtype != w.dtype:
                return None
            key = f"{slot}/{name}"
            changed = torch.nonzero(_bits(v) != _bits(w)).reshape(-1)
            if changed.numel() == 0:
                continue
            small = changed.numel() * (v.element_size() + _POSITION_BYTES) < v.numel() * v.element_size()
            if small and v.numel() <= _MAX_POSITION:
                out[key + "/i"] = changed.to(torch.int32)
                out[key + "/v"] = v.detach().contiguous().reshape(-1)[changed]
            else:
                out[key + "/="] = v.detach().contiguous()
    return Params(out)


def patch_blob_size(patch: Params) -> int:
    """Bytes of ``patch`` as it travels (its slot encoded, header included)."""
    return len(slots_to_bytes({PATCH_SLOT: patch}))


def apply_patch(old: Mapping[str, Params], patch: Params) -> dict[str, Params]:
    """``old`` with ``patch`` applied (new tensors; ``old`` is not changed).

    Raises :class:`UpdateError` naming what is wrong when the patch does not fit ``old``: a tensor
    it lacks or out of its order, positions without values, a whole tensor of another shape or dtype, positions that are not int32,
    not strictly increasing or out of range, values of another dtype or count.
    """
    entries = list(patch.items())
    out: dict[str, dict[str, torch.Tensor]] = {}
    i = 0
    for slot, tensors in old.items():
        out[slot] = {}
        for name, w in tensors.items():
            key = f"{slot}/{name}"
            k, t = entries[i] if i < len(entries) else ("", w)
            if k == key + "/=":
                if t.shape != w.shape or t.dtype != w.dtype:
                    raise UpdateError(
                        f"broadcast patch: whole tensor {key!r} is {t.dtype} {tuple(t.shape)}, "
                        f"the held one {w.dtype} {tuple(w.shape)}"
                    )
                out[slot][name] = t.clone()
                i += 1
            elif k == key + "/i":
                if i + 1 >= len(entries) or entries[i + 1][0] != key + "/v":
                    raise UpdateError(f"broadcast patch: positions of {key!r} come without their values")
                vals = entries[i + 1][1]
                i += 2
                _check_positions(key, t, vals, w)
                flat = w.detach().clone().contiguous().reshape(-1)
                flat[t.to(torch.int64)] = vals
                out[slot][name] = flat.reshape(w.shape)
            else:  # not named: unchanged
                out[slot][name] = w.detach().clone()
    if i != len(entries):
        raise UpdateError(
            f"broadcast patch names a tensor the held broadcast lacks, or out of its order: {entries[i][0]!r}"
        )
    return {slot: Params(tensors) for slot, tensors in out.items()}


def _check_positions(key: str, pos: torch.Tensor, vals: torch.Tensor, held: torch.Tensor) -> None:
    if pos.dtype != torch.int32 or pos.dim() != 1:
        raise UpdateError(
            f"broadcast patch: positions of {key!r} are {pos.dtype} {tuple(pos.shape)}, not int32 1-D"
        )
    if vals.dtype != held.dtype or vals.shape != pos.shape:
        raise UpdateError(
            f"broadcast patch: values of {key!r} are {vals.dtype} {tuple(vals.shape)} for "
            f"{pos.numel()} positions into a {held.dtype} tensor"
        )
    if pos.numel():
        p = pos.to(torch.int64)
        if (
            int(p[0]) < 0
            or int(p[-1]) >= held.numel()
            or (p.numel() > 1 and not bool((p[1:] > p[:-1]).all()))
        ):
            raise UpdateError(
                f"broadcast patch: positions of {key!r} are not strictly increasing within 0..{held.numel() - 1}"
            )
