"""fedloom's declarative loop calls an optimiser's update rule without torch's per-call wrappers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from fedloom.algorithms.local import direct_step

CASES: list[tuple[type[torch.optim.Optimizer], dict[str, Any]]] = [
    (torch.optim.SGD, {"lr": 0.1}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "dampening": 0.0}),
    (torch.optim.Adam, {"lr": 0.01}),
    (torch.optim.Adam, {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1}),
    (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
]


def _run(factory: type[torch.optim.Optimizer], kwargs: dict[str, Any], direct: bool) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    params = [
        torch.randn(7, 5, generator=gen).requires_grad_(),
        torch.randn(5, generator=gen).requires_grad_(),
    ]
    opt = factory(params, **kwargs)
    step: Callable[[], Any] | None = direct_step(opt) if direct else opt.step
    assert step is not None
    for _ in range(6):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        step()
    return [p.detach().clone() for p in params] + [
        t.clone() for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)
    ]


@pytest.mark.parametrize(("factory", "kwargs"), CASES)
def test_the_direct_step_is_torchs_step_bit_for_bit(
    factory: type[torch.optim.Optimizer], kwargs: dict[str, Any]
) -> None:
    ours, torchs = _run(factory, kwargs, True), _run(factory, kwargs, False)
    assert len(ours) == len(torchs) >= 2  # with the optimiser's state, where it keeps one
    for a, b in zip(ours, torchs, strict=True):
        assert torch.equal(a, b)
    start = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(ours[0], start)  # the steps moved the parameters


def test_the_direct_step_steps_aside_where_torchs_wrappers_matter() -> None:
    p = torch.zeros(3, requires_grad=True)
    hooked = torch.optim.SGD([p], lr=0.1)
    hooked.register_step_pre_hook(lambda *_: None)
    assert direct_step(hooked) is None  # a step hook must run
    assert direct_step(torch.optim.SGD([p], lr=0.1, differentiable=True)) is None  # steps under autograd
    assert direct_step(torch.optim.RMSprop([p], lr=0.1)) is None  # not a rule this was checked on
    handle = register_optimizer_step_post_hook(lambda *_: None)
    try:
        assert direct_step(torch.optim.SGD([p], lr=0.1)) is None  # a global hook must run too
    finally:
        handle.remove()
    assert direct_step(torch.optim.SGD([p], lr=0.1)) is not None


def test_a_hook_registered_after_the_direct_step_was_made_still_runs() -> None:
    p = torch.zeros(3, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.1)
    step = direct_step(opt)
    assert step is not None
    calls: list[int] = []
    handle = register_optimizer_step_post_hook(lambda *_: calls.append(1))
    try:
        p.grad = torch.ones(3)
        step()
    finally:
        handle.remove()
    assert calls == [1]
    assert torch.equal(p.detach(), torch.full((3,), -0.1))
