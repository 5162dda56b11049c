"""Parameters: an immutable, ordered mapping from names to tensors.

``Params`` is what flows around a round: the global model, a client's delta, an
aggregate, an optimiser moment. It holds ``torch.Tensor`` values in a fixed key
order (the model's ``state_dict`` order) and offers the arithmetic algorithms
need. Operations never modify their operands; they return new ``Params``.
Callers must treat the tensors inside as read-only.
"""

from __future__ import annotations

import cmath
import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from fedloom.core.errors import UpdateError

__all__ = ["Params"]


class Params(Mapping[str, torch.Tensor]):
    """An ordered, immutable ``name -> tensor`` mapping with elementwise arithmetic.

    Build one with :meth:`from_module`, :meth:`from_tensors` or :meth:`from_numpy`.
    Binary operations require identical names, order and shapes.
    """

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, torch.Tensor]) -> None:
        self._data: dict[str, torch.Tensor] = dict(data)

    # ---- construction -------------------------------------------------
    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> Params:
        """Wrap tensors (detached, not copied)."""
        return cls({k: v.detach() for k, v in tensors.items()})

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> Params:
        """Copy a module's floating-point parameters and buffers, in ``state_dict`` order."""
        return cls({k: v.detach().clone() for k, v in module.state_dict().items()})

    @classmethod
    def from_numpy(cls, arrays: Mapping[str, np.ndarray]) -> Params:
        """Build from NumPy arrays (copied)."""
        return cls({k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()})

    def to_numpy(self) -> dict[str, np.ndarray]:
        """Copy to a dict of NumPy arrays."""
        return {k: v.detach().cpu().numpy().copy() for k, v in self._data.items()}

    def load_into(self, module: torch.nn.Module) -> None:
        """Copy these values into ``module`` in place (the module is the one mutated)."""
        module.load_state_dict(self._data, strict=True)

    # ---- Mapping protocol ---------------------------------------------
    def __getitem__(self, key: str) -> torch.Tensor:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self._data.items())
        return f"Params({{{inner}}})"

    # ---- structure ------------------------------------------------------
    def check_compatible(self, other: Params, *, what: str = "update") -> None:
        """Raise :class:`UpdateError` unless ``other`` has the same names, shapes and dtypes."""
        if list(self._data) != list(other._data):
            missing = sorted(set(self._data) - set(other._data))
            extra = sorted(set(other._data) - set(self._data))
            raise UpdateError(f"{what} has different parameter names: missing {missing}, unexpected {extra}")
        for k, v in self._data.items():
            o = other._data[k]
            if v.shape != o.shape:
                raise UpdateError(
                    f"{what} parameter {k!r} has shape {tuple(o.shape)}, expected {tuple(v.shape)}"
                )
            if v.dtype != o.dtype:
                raise UpdateError(f"{what} parameter {k!r} has dtype {o.dtype}, expected {v.dtype}")

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Params:
        """Apply ``fn`` to every tensor."""
        return Params({k: fn(v) for k, v in self._data.items()})

    def zip_map(self, other: Params, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Params:
        """Apply ``fn`` to matching pairs of tensors (same keys required)."""
        if self._data.keys() != other._data.keys():
            self.check_compatible(other)
        return Params({k: fn(v, other._data[k]) for k, v in self._data.items()})

    def zeros_like(self) -> Params:
        return self.map(torch.zeros_like)

    def clone(self) -> Params:
        return self.map(torch.clone)

    def num_elements(self) -> int:
        return sum(v.numel() for v in self._data.values())

    def num_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self._data.values())

    # ---- arithmetic -----------------------------------------------------
    def __add__(self, other: Params) -> Params:
        return self.zip_map(other, torch.add)

    def __sub__(self, other: Params) -> Params:
        return self.zip_map(other, torch.sub)

    def __mul__(self, scalar: float) -> Params:
        return self.map(lambda v: v * scalar)

    __rmul__ = __mul__

    def __truediv__(self, scalar: float) -> Params:
        return self.map(lambda v: v / scalar)

    def __neg__(self) -> Params:
        return self.map(torch.neg)

    def div_(self, scalar: float) -> Params:
        """Divide every tensor by ``scalar`` in place; returns ``self``."""
        for v in self._data.values():
            v.div_(scalar)
        return self

    def add_scaled(self, other: Params, alpha: float) -> Params:
        """``self + alpha * other`` in one pass per tensor."""
        return self.zip_map(other, lambda a, b: torch.add(a, b, alpha=alpha))

    def dot(self, other: Params) -> float:
        """Inner product over all elements (accumulated in float64)."""
        total = 0.0
        for k, v in self._data.items():
            total += float(torch.sum(v.double() * other._data[k].double()))
        return total

    def l2_norm(self) -> float:
        """Global L2 norm over all tensors (accumulated in float64)."""
        # vector_norm(dtype=float64) is 14x faster than squaring a float64 copy; it takes
        # floating tensors only, so integer buffers are converted first.
        return math.sqrt(
            sum(
                float(
                    torch.linalg.vector_norm(v if v.is_floating_point() else v.double(), dtype=torch.float64)
                )
                ** 2
                for v in self._data.values()
            )
        )

    def all_finite(self) -> bool:
        return all(_finite(v) for v in self._data.values())

    def allclose(self, other: Params, *, rtol: float = 1e-5, atol: float = 1e-8) -> bool:
        self.check_compatible(other, what="other")
        return all(torch.allclose(v, other._data[k], rtol=rtol, atol=atol) for k, v in self._data.items())

    def equal(self, other: Params) -> bool:
        """Bit-for-bit equality (same names, shapes, dtypes and values)."""
        if list(self._data) != list(other._data):
            return False
        return all(
            v.dtype == other._data[k].dtype and torch.equal(v, other._data[k]) for k, v in self._data.items()
        )

    @staticmethod
    def weighted_sum(items: Sequence[Params], weights: Sequence[float]) -> Params:
        """``sum_i weights[i] * items[i]``, accumulated in item order (deterministic)."""
        if not items:
            raise ValueError("weighted_sum needs at least one item")
        return Params.accumulate(None, items, weights)

    @staticmethod
    def accumulate(acc: Params | None, items: Sequence[Params], weights: Sequence[float]) -> Params:
        """Continue the :meth:`weighted_sum` of earlier items (``acc``) with ``items``.

        ``accumulate(accumulate(None, a, wa), b, wb)`` is bit-identical to
        ``weighted_sum(a + b, wa + wb)``: every tensor is one left-to-right chain
        (``w0 * x0``, then ``add_(x, alpha=w)``), so the chain can be extended as
        items arrive or cut between processes -- how executors sum a round's updates
        (:mod:`fedloom.sim.reduce`).
        ``acc``'s tensors are updated in place and must belong to the caller.
        """
        if len(items) != len(weights):
            raise ValueError(f"{len(items)} items but {len(weights)} weights")
        if not items:
            if acc is None:
                raise ValueError("accumulate needs an accumulator or at least one item")
            return acc
        names = list(items[0]._data)
        if acc is None:
            sums = list(torch._foreach_mul([items[0]._data[k] for k in names], weights[0]))
        else:
            sums = [acc._data[k] for k in names]
            torch._foreach_add_(sums, [items[0]._data[k] for k in names], alpha=weights[0])
        # foreach ops are the per-tensor kernels in one call: the same chain, tensor by tensor
        for item, w in zip(items[1:], weights[1:], strict=True):
            torch._foreach_add_(sums, [item._data[k] for k in names], alpha=w)
        return Params(dict(zip(names, sums, strict=True)))

    @staticmethod
    def mean(items: Sequence[Params]) -> Params:
        """The unweighted mean: the sum in item order, divided by the count (as :func:`weighted_mean`
        divides by the total weight, so this equals it with every weight 1)."""
        n = len(items)
        return Params.weighted_sum(items, [1.0] * n).div_(n)


_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def _finite(v: torch.Tensor) -> bool:
    """True when no element of ``v`` is NaN or infinite.

    First the sum: a NaN or an infinity among the elements makes it NaN or
    infinite, so a finite sum proves every element finite in one reduction (about
    2.5x faster than an element-wise test on a 2NN delta, which every client and a
    server checks for every update). A sum that is not finite -- a non-finite
    element, or finite ones whose sum overflows -- is decided element by element:
    on CPU by NumPy's ``isfinite`` (one pass where torch's makes four).
    """
    if not (v.is_floating_point() or v.is_complex()):
        return True
    if v.numel() and not v.requires_grad and v.device.type == "cpu":
        total = complex(v.sum()) if v.is_complex() else float(v.sum())
        if cmath.isfinite(total):
            return True
    if v.device.type == "cpu" and v.dtype in _NUMPY_FLOATS and not v.requires_grad:
        return bool(np.isfinite(v.numpy()).all())
    return bool(torch.isfinite(v).all())
