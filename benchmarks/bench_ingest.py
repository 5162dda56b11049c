"""The deployed server's ingest of one round's updates, without gRPC: what the event loop spends per update.

Twenty 2NN updates (199,210 float32 parameters each, encoded as a client encodes them) are handed
to a real :class:`~fedloom.net.coordinator.Coordinator`
(in a process set up as ``fedloom server`` sets itself up) over a real
:class:`~fedloom.net.state.NetState` (SQLite in WAL mode, slot files) in a temporary directory,
one round after another: each is checksummed, written to its slot, decoded, validated (names,
shapes, dtypes, NaN/inf) and recorded with its audit line, as ``Push`` does on the server's event
loop. Then the round is closed and aggregated (FedAvg) as the round loop does.

Baseline, in the same run: the same blobs only written to their slot files (``NetState.stage``,
the durable copy every accepted update needs) and released. The ratio is what decoding,
validation and bookkeeping add on top of that copy.

Run::

    PYTHONPATH=src .venv/bin/python benchmarks/bench_ingest.py [--rounds 30] [--clients 20]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fedloom.algorithms.api import Broadcast, ClientUpdate, ServerContext
from fedloom.config.schema import ExperimentConfig
from fedloom.core.params import Params
from fedloom.models.zoo import build_model
from fedloom.net.coordinator import Coordinator
from fedloom.net.logs import JsonLog
from fedloom.net.memory import keep_freed_buffers
from fedloom.net.state import NetState
from fedloom.net.wire import encode_broadcast, encode_update
from fedloom.sim.build import build_algorithm, build_pipeline
from fedloom.sim.server_round import apply_updates


def _updates(params: Params, clients: int, rounds: int) -> dict[int, list[tuple[str, bytes]]]:
    """Per round, each client's (header JSON, blob), with distinct values per round and client."""
    out: dict[int, list[tuple[str, bytes]]] = {}
    for r in range(1, rounds + 1):
        out[r] = []
        for c in range(clients):
            g = torch.Generator().manual_seed(1000 * r + c)
            delta = params.map(lambda v, g=g: 1e-3 * torch.randn(v.shape, generator=g))
            out[r].append(encode_update(ClientUpdate(c, delta, 10.0, 10, 1, {"train_loss": 1.0})))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--clients", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    keep_freed_buffers()  # as `fedloom server` does at start
    params = Params.from_module(build_model("2nn", {}, seed=0))
    blob = encode_broadcast(Broadcast(round=1, params=params))
    digest = hashlib.sha256(blob).hexdigest()
    cfg = ExperimentConfig()
    algorithm, pipeline = build_algorithm(cfg), build_pipeline(cfg)
    state = algorithm.server_init(params)
    updates = _updates(params, args.clients, args.rounds)
    names = [str(i) for i in range(args.clients)]
    ingest, aggregate, bare = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        with NetState(Path(tmp) / "a" / "state.sqlite") as net:
            coord = Coordinator(names, net, pipeline, JsonLog("server", stream=io.StringIO()))
            for r in range(1, args.rounds + 1):
                ctx = ServerContext(seed=0, round=r, population=args.clients)
                coord.open_round(
                    Broadcast(round=r, params=params),
                    blob,
                    digest,
                    attempt=1,
                    selected=list(range(args.clients)),
                    target=args.clients,
                    deadline_s=60.0,
                    ctx=ctx,
                )
                t0 = time.perf_counter()
                for c, (meta, data) in enumerate(updates[r]):
                    err = coord.submit(c, r, digest, meta, memoryview(data))
                    if err is not None:
                        raise SystemExit(f"round {r} client {c} rejected: {err}")
                t1 = time.perf_counter()
                closed = coord.wait_close()
                apply_updates(algorithm, pipeline, state, closed.updates, ctx)
                t2 = time.perf_counter()
                net.clear_pending(r)
                coord.finish({"round": r})
                ingest.append(t1 - t0)
                aggregate.append(t2 - t1)
        with NetState(Path(tmp) / "b" / "state.sqlite") as net:
            for r in range(1, args.rounds + 1):
                t0 = time.perf_counter()
                staged = [net.stage(r, c, memoryview(data)) for c, (_, data) in enumerate(updates[r])]
                bare.append(time.perf_counter() - t0)
                for s in staged:
                    net.discard(s)
    # The first round creates the slot files and fills the header cache: left out.
    ms = [1000 * statistics.median(x[1:]) for x in (ingest, aggregate, bare)]
    print(f"{args.clients} 2NN updates per round, {args.rounds} rounds (the first left out), medians:")
    print(f"  ingest (checksum, slot write, decode, validate, record): {ms[0]:.2f} ms per round, "
          f"{1000 * ms[0] / args.clients:.0f} us per update")  # fmt: skip
    print(f"  close + FedAvg aggregation: {ms[1]:.2f} ms per round")
    print(
        f"  baseline, the slot writes alone: {ms[2]:.2f} ms per round; ingest / baseline = {ms[0] / ms[2]:.2f}x"
    )


if __name__ == "__main__":
    main()
