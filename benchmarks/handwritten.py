"""The hand-written baselines of ``bench_tasks.py``: a tight FedAvg loop in plain PyTorch.

Imports nothing from fedloom, so its start-up is what a script of its own would pay.
It reads the MNIST IDX files itself and the client partition and cohorts from a
plan file (``.npz`` written by ``bench_tasks.py`` from fedloom's partition, so
both sides train exactly the same clients on exactly the same rows).

``--procs 1``: the single-process loop (torch's default threads unless
``--threads``). ``--procs P``: the floor -- the same loop forked over ``P``
processes with one torch thread each; each round the cohort is split by greedy
LPT on local steps, every process adds its clients' weighted deltas into its own
shared-memory partial sum, and after one barrier per round every process adds the
``P`` partial sums into its own copy of the global model. There is no
serialisation, no transport and no aggregation step beyond that addition.

After each round the loop prints ``round N`` (flushed); the harness timestamps
the lines as they arrive, exactly as it does fedloom's own progress lines.

``--opt``: ``sgd`` (plain), ``momentum`` (SGD, momentum 0.9), ``adam``, or
``custom`` (the loop of ``examples/custom_loop/mnist_custom.py``: Adam, gradient
clipping at norm 1, a cosine schedule over the round's steps, the mean loss kept).
Optimiser state starts fresh every round for every client, as in fedloom.
"""

from __future__ import annotations

import argparse
import gzip
import math
import multiprocessing as mp
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class TwoNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 200), nn.Linear(200, 200), nn.Linear(200, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x.flatten(1)))
        out: torch.Tensor = self.fc3(torch.relu(self.fc2(x)))
        return out


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=2)
        self.fc1, self.fc2 = nn.Linear(64 * 7 * 7, 512), nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        out: torch.Tensor = self.fc2(torch.relu(self.fc1(x.flatten(1))))
        return out


def load_train(data_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST training images as float32 ``(N, 1, 28, 28)``, ``(x/255 - 0.1307) / 0.3081``, and int64 labels."""

    def read(stem: str) -> bytes:
        raw, gz = data_dir / stem, data_dir / f"{stem}.gz"
        return raw.read_bytes() if raw.exists() else gzip.decompress(gz.read_bytes())

    images = np.frombuffer(read("train-images-idx3-ubyte"), np.uint8, offset=16).reshape(-1, 28, 28)
    labels = np.frombuffer(read("train-labels-idx1-ubyte"), np.uint8, offset=8)
    x = torch.from_numpy(images.copy()).to(torch.float32).div_(255.0).sub_(0.1307).div_(0.3081)
    return x.unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def make_optimizer(kind: str, params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if kind == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.Adam(params, lr=lr)


def train_client(
    model: nn.Module, params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, args: Any,
    gen: torch.Generator,
) -> float | None:  # fmt: skip
    """E passes over (x, y) in reshuffled minibatches of B (the last may be smaller).

    The custom loop returns its mean loss, as the custom task's training function does.
    """
    n, bs = len(y), args.batch
    opt = make_optimizer(args.opt, params, args.lr)
    if args.opt != "custom":
        for _ in range(args.epochs):
            perm = torch.randperm(n, generator=gen)
            for b in range(0, n, bs):
                j = perm[b : b + bs]
                opt.zero_grad()
                F.cross_entropy(model(x[j]), y[j]).backward()
                opt.step()
        return None
    steps = args.epochs * math.ceil(n / bs)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    total = torch.zeros((), dtype=torch.float64)
    for _ in range(args.epochs):
        perm = torch.randperm(n, generator=gen)
        for b in range(0, n, bs):
            j = perm[b : b + bs]
            opt.zero_grad()
            loss = F.cross_entropy(model(x[j]), y[j])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
            opt.step()
            sched.step()
            total += loss.detach()
    return float(total) / max(steps, 1)


def lpt(cohort: np.ndarray, steps: np.ndarray, procs: int) -> list[list[int]]:
    """Greedy longest-processing-time split of ``cohort`` by local steps."""
    shares: list[list[int]] = [[] for _ in range(procs)]
    load = [0] * procs
    for cid in sorted(cohort.tolist(), key=lambda c: (-int(steps[c]), c)):
        k = load.index(min(load))
        shares[k].append(cid)
        load[k] += int(steps[cid])
    return shares


def run(args: Any, worker: int, shares: list[list[list[int]]], partial: list[list[list[torch.Tensor]]] | None,
        barrier: Any) -> None:  # fmt: skip
    """Worker ``worker``'s rounds; with ``procs == 1`` the whole single-process loop."""
    plan = args.plan_data
    x_all, y_all = args.data
    offsets, order = plan["offsets"], torch.from_numpy(plan["indices"])
    torch.manual_seed(0)
    model = TwoNN() if args.model == "2nn" else CNN()
    params = list(model.parameters())
    glob = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(1 + worker)
    for r, cohort in enumerate(plan["cohorts"][: args.rounds]):
        mine = shares[r][worker] if shares else cohort.tolist()
        # The weighted sum of this process's deltas, then its example count.
        if partial is None:
            acc = [torch.zeros_like(g) for g in glob] + [torch.zeros((), dtype=torch.float64)]
        else:
            acc = partial[r % 2][worker]
            for a in acc:
                a.zero_()
        for cid in mine:
            rows = order[int(offsets[cid]) : int(offsets[cid + 1])]
            x, y = x_all[rows], y_all[rows]
            with torch.no_grad():
                for p, g in zip(params, glob, strict=True):
                    p.copy_(g)
            train_client(model, params, x, y, args, gen)
            with torch.no_grad():
                torch._foreach_add_(
                    acc[:-1], torch._foreach_sub([p.detach() for p in params], glob), alpha=len(rows)
                )
                acc[-1] += len(rows)
        if partial is not None:
            barrier.wait()
            sums = [torch.stack([part[i] for part in partial[r % 2]]).sum(0) for i in range(len(acc))]
        else:
            sums = acc
        total = float(sums[-1])
        torch._foreach_add_(glob, sums[:-1], alpha=1.0 / total)
        if worker == 0:
            print(f"round {r + 1} examples {int(total)}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--model", choices=["2nn", "cnn"], default="2nn")
    ap.add_argument("--opt", choices=["sgd", "momentum", "adam", "custom"], default="sgd")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--procs", type=int, default=1)
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads of the single-process loop (0 = default)"
    )
    args = ap.parse_args()
    if args.procs > 1 or args.threads:
        torch.set_num_threads(1 if args.procs > 1 else args.threads)
    with np.load(args.plan) as f:
        args.plan_data = {k: f[k] for k in f.files}
    args.data = load_train(Path(args.data_dir))
    if args.procs == 1:
        run(args, 0, [], None, None)
        return
    plan = args.plan_data
    steps = args.epochs * np.ceil(np.diff(plan["offsets"]) / args.batch).astype(np.int64)
    shares = [lpt(c, steps, args.procs) for c in plan["cohorts"][: args.rounds]]
    torch.manual_seed(0)
    model = TwoNN() if args.model == "2nn" else CNN()
    shapes = [(p.shape, p.dtype) for p in model.parameters()] + [(torch.Size(()), torch.float64)]
    # Two sets of partial sums, used by alternate rounds, so one barrier per round suffices:
    # nobody rewrites round r's sums before everyone has passed round r+1's barrier.
    partial = [
        [[torch.zeros(s, dtype=d).share_memory_() for s, d in shapes] for _ in range(args.procs)]
        for _ in range(2)
    ]
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(args.procs)
    children = [
        ctx.Process(target=run, args=(args, k, shares, partial, barrier)) for k in range(1, args.procs)
    ]
    for c in children:
        c.start()
    run(args, 0, shares, partial, barrier)
    for c in children:
        c.join()
        if c.exitcode != 0:
            sys.exit(f"floor worker {c.pid} exited with {c.exitcode}")


if __name__ == "__main__":
    main()
