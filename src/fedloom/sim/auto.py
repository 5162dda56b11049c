"""Choosing and building the executor named by the experiment's ``executor`` key.

``auto`` (the default) follows the executor benchmarks (``docs/benchmarks.md``):

* a CUDA device is present -> ``vectorized`` on it (many small clients at once
  is the lever on a GPU);
* one usable CPU core, or a cohort too small to give every worker two clients
  -> ``sequential`` (no pool to start, nothing to gain);
* otherwise -> ``parallel`` with one worker per core (client-level
  parallelism; vmap on CPU is no faster than the plain loop).

The choice and its reason are logged on the ``fedloom`` logger.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from dataclasses import dataclass

import torch

from fedloom.config.schema import ExperimentConfig
from fedloom.sim.build import Components
from fedloom.sim.executor import Executor, ExecutorError, SequentialExecutor
from fedloom.sim.sampling import cohort_size

__all__ = ["ExecutorChoice", "available_cores", "choose_executor", "make_executor"]

log = logging.getLogger("fedloom")


@dataclass(frozen=True)
class ExecutorChoice:
    """The executor to build: ``kind``, its ``workers`` (where they apply), device and why."""

    kind: str
    workers: int
    device: str
    reason: str


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def choose_executor(
    requested: str,
    workers: int,
    cohort: int,
    *,
    cores: int | None = None,
    cuda: bool | None = None,
    fork: bool | None = None,
) -> ExecutorChoice:
    """Resolve ``requested`` (an ``executor`` value) into a concrete choice; pure, for testing."""
    cores = available_cores() if cores is None else cores
    cuda = torch.cuda.is_available() if cuda is None else cuda
    fork = "fork" in mp.get_all_start_methods() if fork is None else fork
    n = workers if workers > 0 else cores
    if requested != "auto":
        device = "cuda" if requested == "vectorized" and cuda else "cpu"
        return ExecutorChoice(requested, n, device, "requested in the configuration")
    if cuda:
        return ExecutorChoice("vectorized", 1, "cuda", "a CUDA device is available")
    if n < 2:
        return ExecutorChoice("sequential", 1, "cpu", f"{n} worker(s) available: nothing to parallelise")
    if not fork:
        return ExecutorChoice("sequential", 1, "cpu", "this platform cannot fork worker processes")
    if cohort < 2 * n:
        return ExecutorChoice(
            "sequential", 1, "cpu", f"{cohort} clients per round is too few to share among {n} workers"
        )
    return ExecutorChoice("parallel", n, "cpu", f"{n} CPU cores, {cohort} clients per round")


def make_executor(cfg: ExperimentConfig, comps: Components) -> Executor:
    """Build the executor ``cfg.executor`` names (resolving ``auto``) and log the choice."""
    cohort = cohort_size(comps.train.num_clients, cfg.sampling.fraction, cfg.sampling.min_clients)
    choice = choose_executor(cfg.executor, cfg.workers, cohort)
    log.info(
        "executor: %s (workers=%d, device=%s): %s", choice.kind, choice.workers, choice.device, choice.reason
    )
    if choice.kind == "parallel":
        from fedloom.sim.parallel import ParallelExecutor

        return ParallelExecutor(comps.workspace, comps.train, comps.pipeline, workers=choice.workers)
    if choice.kind == "vectorized":
        from fedloom.sim.vectorized import VectorizedExecutor

        return VectorizedExecutor(
            comps.workspace, comps.train, comps.pipeline, device=choice.device, block=cfg.vectorized_block
        )
    if choice.kind == "ray":
        try:
            from fedloom.sim.ray_executor import RayExecutor
        except ImportError as exc:
            raise ExecutorError(
                "executor = 'ray' needs Ray: pip install 'fedloom[ray]' (or pick another executor)"
            ) from exc
        return RayExecutor(comps.workspace, comps.train, comps.pipeline, workers=choice.workers)
    return SequentialExecutor(comps.workspace, comps.train, comps.pipeline)
