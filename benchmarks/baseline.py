"""Shared pieces of the speed benchmarks: the hand-written baseline loop and a round timer.

``bare_loop`` is the minimal FedAvg loop a researcher would write by hand with
plain PyTorch (one model, ``torch.optim.SGD``, example-weighted averaging); every
speed benchmark measures fedloom against it in the same process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from fedloom.sim.executor import ClientFailure

__all__ = ["RoundTimer", "bare_loop"]


class RoundTimer:
    """A RoundListener recording a timestamp at the start and after every round."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_start(self, first_round: int, rounds: int, info: Mapping[str, Any]) -> None:
        self.stamps.append(time.perf_counter())

    def on_round(self, metrics: Mapping[str, Any]) -> None:
        self.stamps.append(time.perf_counter())

    def on_failure(self, failure: ClientFailure, round: int) -> None:
        raise RuntimeError(failure.reason)


def bare_loop(
    train: Any, cohorts: list[list[int]], make_model: Callable[[], torch.nn.Module], lr: float, batch: int,
    seed: int, device: str = "cpu",
) -> list[float]:  # fmt: skip
    """The minimal FedAvg loop a researcher would write by hand; returns seconds per round."""
    model = make_model().to(device)
    glob = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    times = []
    for cohort in cohorts:
        t0 = time.perf_counter()
        acc = {k: torch.zeros_like(v) for k, v in glob.items()}
        total = 0
        for cid in cohort:
            data = train.client_data(cid)
            x, y = data.x.to(device), data.y.to(device)
            model.load_state_dict(glob)
            opt = torch.optim.SGD(model.parameters(), lr=lr)
            n = len(data)
            perm = torch.randperm(n, generator=gen).to(device)
            for b in range(0, n, batch):
                idx = perm[b : b + batch]
                opt.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
            for k, v in model.state_dict().items():
                acc[k].add_(v - glob[k], alpha=n)
            total += n
        glob = {k: glob[k] + acc[k] / total for k in glob}
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times
