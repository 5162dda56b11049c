from __future__ import annotations

import numpy as np
import torch

from fedloom.core.rng import derive_seed, numpy_rng, torch_rng
from fedloom.sim.sampling import cohort_size, sample_clients


def test_streams_depend_only_on_coordinates() -> None:
    assert derive_seed(1, "x", round=2, client=3) == derive_seed(1, "x", round=2, client=3)
    seeds = {
        derive_seed(1, "x", round=2, client=3),
        derive_seed(2, "x", round=2, client=3),
        derive_seed(1, "y", round=2, client=3),
        derive_seed(1, "x", round=3, client=3),
        derive_seed(1, "x", round=2, client=4),
    }
    assert len(seeds) == 5
    a = torch.randperm(100, generator=torch_rng(7, "p", round=1, client=1))
    b = torch.randperm(100, generator=torch_rng(7, "p", round=1, client=1))
    assert torch.equal(a, b)
    assert numpy_rng(7, "q").integers(0, 1 << 30) == numpy_rng(7, "q").integers(0, 1 << 30)


def test_derivation_does_not_touch_global_state() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    torch_rng(1, "x")
    numpy_rng(1, "x").random()
    assert torch.equal(torch.rand(3), expected)


def test_sampling_is_seeded_per_round_without_replacement() -> None:
    a = sample_clients(0, 5, 100, 10)
    assert np.array_equal(a, sample_clients(0, 5, 100, 10))
    assert len(set(a.tolist())) == 10
    assert np.all(np.diff(a) > 0)
    assert not np.array_equal(a, sample_clients(0, 6, 100, 10))
    assert cohort_size(100, 0.1, 1) == 10
    assert cohort_size(100, 0.01, 5) == 5
    assert cohort_size(3, 0.5, 10) == 3
    assert cohort_size(1000, 0.001, 1) == 1
