"""Server optimisers applied to the aggregated pseudo-gradient.

The server treats ``-aggregate.delta`` as a gradient (Reddi et al. 2021,
arXiv 2003.00295). Plain SGD with ``lr = 1`` and no momentum reproduces FedAvg
exactly (``params + delta``); momentum gives FedAvgM. Optimisers are pure:
``step`` returns new parameters and new slots, never mutating its inputs.

The adaptive optimisers follow Algorithm 2 of Reddi et al. (FedAdagrad, FedYogi,
FedAdam) on the pseudo-gradient ``Delta_t = aggregate.delta``, elementwise::

    m_t = beta1 m_{t-1} + (1 - beta1) Delta_t
    v_t = v_{t-1} + Delta_t^2                                        (Adagrad)
    v_t = v_{t-1} - (1 - beta2) Delta_t^2 sign(v_{t-1} - Delta_t^2)  (Yogi)
    v_t = beta2 v_{t-1} + (1 - beta2) Delta_t^2                      (Adam)
    x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)

with no bias correction (the paper has none). Initial slots: ``m_{-1} = 0`` and
``v_{-1} = tau^2``, the smallest value Algorithm 2 admits (it requires
``v_{-1} >= tau^2``). Defaults ``beta1 = 0.9``, ``beta2 = 0.99``, ``tau = 1e-3``
(the paper tunes ``tau`` and ``eta``; 1e-3 is a typical choice there).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from fedloom.core.params import Params

__all__ = ["ServerAdagrad", "ServerAdam", "ServerOptimizer", "ServerSGD", "ServerYogi", "adaptive_step"]


class ServerOptimizer(Protocol):
    """``init`` creates the optimiser slots; ``step`` applies one aggregated delta."""

    def init(self, params: Params) -> Mapping[str, Params]: ...

    def step(
        self, params: Params, delta: Params, slots: Mapping[str, Params], round: int
    ) -> tuple[Params, Mapping[str, Params]]: ...


@dataclass(frozen=True)
class ServerSGD:
    """``m <- momentum * m + delta``; ``params <- params + lr * m`` (``m = delta`` without momentum)."""

    lr: float = 1.0
    momentum: float = 0.0

    def init(self, params: Params) -> Mapping[str, Params]:
        return {"momentum": params.zeros_like()} if self.momentum > 0 else {}

    def step(
        self, params: Params, delta: Params, slots: Mapping[str, Params], round: int
    ) -> tuple[Params, Mapping[str, Params]]:
        if self.momentum > 0:
            m = slots["momentum"] * self.momentum + delta
            return params.add_scaled(m, self.lr), {"momentum": m}
        if self.lr == 1.0:
            return params + delta, {}
        return params.add_scaled(delta, self.lr), {}


SecondMoment = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(v_prev, delta_sq) -> v_new`` for one tensor."""


def adaptive_step(
    params: Params,
    delta: Params,
    slots: Mapping[str, Params],
    *,
    lr: float,
    beta1: float,
    tau: float,
    second_moment: SecondMoment,
) -> tuple[Params, Mapping[str, Params]]:
    """One step of Algorithm 2 of arXiv 2003.00295 with the given ``v`` update (see the module docstring)."""
    m = slots["m"].zip_map(delta, lambda m0, d: m0 * beta1 + d * (1.0 - beta1))
    v = slots["v"].zip_map(delta, lambda v0, d: second_moment(v0, d * d))
    step = m.zip_map(v, lambda m1, v1: m1 / (torch.sqrt(v1) + tau))
    return params.add_scaled(step, lr), {"m": m, "v": v}


def _init_slots(params: Params, tau: float) -> Mapping[str, Params]:
    return {"m": params.zeros_like(), "v": params.map(lambda t: torch.full_like(t, tau * tau))}


def _check(name: str, lr: float, beta1: float, beta2: float, tau: float) -> None:
    problems = []
    if not lr > 0:
        problems.append(f"lr must be > 0, got {lr}")
    if not 0 <= beta1 < 1:
        problems.append(f"beta1 must lie in [0, 1), got {beta1}")
    if not 0 <= beta2 < 1:
        problems.append(f"beta2 must lie in [0, 1), got {beta2}")
    if not tau > 0:
        problems.append(f"tau must be > 0, got {tau}")
    if problems:
        raise ValueError(f"{name}: " + "; ".join(problems))


@dataclass(frozen=True)
class ServerAdagrad:
    """FedAdagrad: ``v_t = v_{t-1} + Delta_t^2`` (``beta1 = 0`` drops the momentum)."""

    lr: float = 0.1
    beta1: float = 0.9
    tau: float = 1e-3

    def __post_init__(self) -> None:
        _check("ServerAdagrad", self.lr, self.beta1, 0.0, self.tau)

    def init(self, params: Params) -> Mapping[str, Params]:
        return _init_slots(params, self.tau)

    def step(
        self, params: Params, delta: Params, slots: Mapping[str, Params], round: int
    ) -> tuple[Params, Mapping[str, Params]]:
        return adaptive_step(
            params, delta, slots, lr=self.lr, beta1=self.beta1, tau=self.tau, second_moment=torch.add
        )


@dataclass(frozen=True)
class ServerYogi:
    """FedYogi: ``v_t = v_{t-1} - (1 - beta2) Delta_t^2 sign(v_{t-1} - Delta_t^2)``."""

    lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        _check("ServerYogi", self.lr, self.beta1, self.beta2, self.tau)

    def init(self, params: Params) -> Mapping[str, Params]:
        return _init_slots(params, self.tau)

    def step(
        self, params: Params, delta: Params, slots: Mapping[str, Params], round: int
    ) -> tuple[Params, Mapping[str, Params]]:
        b2 = self.beta2

        def yogi(v0: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
            return v0 - (1.0 - b2) * d2 * torch.sign(v0 - d2)

        return adaptive_step(
            params, delta, slots, lr=self.lr, beta1=self.beta1, tau=self.tau, second_moment=yogi
        )


@dataclass(frozen=True)
class ServerAdam:
    """FedAdam: ``v_t = beta2 v_{t-1} + (1 - beta2) Delta_t^2``, no bias correction."""

    lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        _check("ServerAdam", self.lr, self.beta1, self.beta2, self.tau)

    def init(self, params: Params) -> Mapping[str, Params]:
        return _init_slots(params, self.tau)

    def step(
        self, params: Params, delta: Params, slots: Mapping[str, Params], round: int
    ) -> tuple[Params, Mapping[str, Params]]:
        b2 = self.beta2

        def adam(v0: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
            return v0 * b2 + d2 * (1.0 - b2)

        return adaptive_step(
            params, delta, slots, lr=self.lr, beta1=self.beta1, tau=self.tau, second_moment=adam
        )
