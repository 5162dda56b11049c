"""Deployment overhead on loopback: a real server process and N clients in a few load-generator processes.

Measures, for the McMahan 2NN (784-200-200-10, 199,210 float32 parameters = 796,840 bytes):

* server overhead per round = round wall time (server: from one round's opening to the next's,
  so the aggregation, the checkpoint's commit, the clean-up and the gap before the next
  round all count) minus the slowest client's reported compute. The clients return
  a fixed precomputed delta (compute ~0), so the overhead includes everything else:
  download, upload, validation, decode, aggregation, the durable writes (pending updates +
  checkpoint) and the clients' own (de)serialisation. The clients run as threads in
  ``--procs`` processes (by default one per CPU core) so that one generator's GIL does not
  dominate; on a small machine they still share the CPUs with the server, and more
  processes than cores cost more than they spread (on 2 cores: about 46 ms with 2
  processes, 52-58 ms with 4, 54-55 ms with 1). The server commits a round's checkpoint in
  the background while the next round runs, so a round is measured from opening to opening.
  Also reported: the server's per-phase timings
  from its ``round_committed`` log line (see :mod:`fedloom.net.timing`), and the CPU time the
  host stole from this VM during each run (``/proc/stat``): on a shared host that, not the
  code, is most of why the same command gives 45 ms one hour and 200 ms the next;
* bytes on the wire per client per round, each direction, counted by a TCP relay
  between the clients and the server (HTTP/2 + gRPC framing, polls, heartbeats and
  joins included, amortised over the rounds), against the raw parameter bytes.

Baseline measured in the same run (``--floor``, on by default): the same number of
clients in the same load-generator processes exchange the same bytes with a bare
gRPC server -- generic handlers on raw ``bytes`` (no protobuf, no validation, no
state, no aggregation): per round, a long-poll for the round that returns the
broadcast-sized blob (as fedloom's GetTask does), one unary upload of an update-sized blob. Its round wall
time is what gRPC's Python runtime costs on this machine for the traffic alone; the
ratio ``overhead / floor`` is what fedloom adds on top.

Targets: overhead < 50 ms/round at 20 clients; wire bytes <= 1.05x raw each way.

Run::

    PYTHONPATH=src .venv/bin/python benchmarks/bench_net.py --clients 20 --rounds 40 [--procs N] [--repeats 3]

Compression on the wire (``--wire-only``: the relayed run alone; ``--set`` overrides the run's
config, whose ``[compression]`` the clients apply as ``fedloom client`` does; ``--model 2nn-large``
is the 784-3000-3000-10 2NN, 11,388,010 parameters)::

    PYTHONPATH=src .venv/bin/python benchmarks/bench_net.py --model 2nn-large --clients 4 --rounds 4 \
        --wire-only --set compression.codec=qsgd --set compression.bits=8 --set compression.downlink=q8
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from fedloom.algorithms.api import Broadcast, ClientContext, ClientState, ClientUpdate, ServerContext
from fedloom.config.schema import ExperimentConfig
from fedloom.core.params import Params
from fedloom.models.zoo import build_model
from fedloom.net.client import ClientOptions, NetClient, Work
from fedloom.net.logs import JsonLog
from fedloom.net.memory import keep_freed_buffers
from fedloom.net.wire import encode_broadcast, encode_update
from fedloom.sim.build import build_pipeline

REPO = Path(__file__).resolve().parents[1]
MODELS = {"2nn": 200, "2nn-large": 3000}  # the 2NN's hidden width


def _cpu_ticks() -> tuple[int, int] | None:
    """(all CPU ticks, stolen ticks) since boot from ``/proc/stat`` (None off Linux).

    Steal is the time the hypervisor ran something else while this VM wanted the CPU: on a
    shared host it is why the same command's rounds can take twice as long an hour later.
    """
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
    return sum(ticks), ticks[7] if len(ticks) > 7 else 0


def _steal_pct(before: tuple[int, int] | None) -> float:
    """Percent of the machine's CPU time stolen by the host since ``before`` (NaN if unknown)."""
    after = _cpu_ticks()
    if before is None or after is None or after[0] <= before[0]:
        return float("nan")
    return 100.0 * (after[1] - before[1]) / (after[0] - before[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Relay:
    """A counting TCP relay: ``up`` = client -> server bytes, ``down`` = server -> client bytes."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.up = 0
        self.down = 0
        self._lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.port = int(self.sock.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                s = socket.create_connection(("127.0.0.1", self.target))
            except OSError:  # the server is not up yet: the client retries
                c.close()
                continue
            for a, b, up in ((c, s, True), (s, c, False)):
                threading.Thread(target=self._pipe, args=(a, b, up), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                with self._lock:
                    if up:
                        self.up += len(data)
                    else:
                        self.down += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for x in (src, dst):
                with contextlib.suppress(OSError):
                    x.shutdown(socket.SHUT_RDWR)


def _fixed_work(cfg: ExperimentConfig) -> Work:
    """A client that sends the same random delta every round, through the run's uplink codec
    (``[compression]``, as ``fedloom client`` would)."""
    delta: list[Params] = []
    pipeline = build_pipeline(cfg)

    def work(b: Broadcast, cs: ClientState | None, cctx: ClientContext, sctx: ServerContext) -> ClientUpdate:
        if not delta:
            g = torch.Generator().manual_seed(cctx.client_id)
            delta.append(b.params.map(lambda v: 1e-3 * torch.randn(v.shape, generator=g)))
        update = ClientUpdate(cctx.client_id, delta[0], 10.0, 10, 1, {"train_loss": 1.0})
        return pipeline.client(update, sctx) if pipeline.stages else update

    return work


def worker(server: str, names: list[str]) -> None:
    """One load-generator process: a client thread per name (set up as `fedloom client` is)."""
    torch.set_num_threads(1)
    keep_freed_buffers()
    sink = io.StringIO()
    threads, clients = [], []
    for n in names:
        c = NetClient(
            ClientOptions(server=server, name=n, give_up_after_s=60),
            JsonLog(f"client:{n}", stream=sink),
            work=_fixed_work,
        )
        t = threading.Thread(target=c.serve, daemon=True)
        t.start()
        threads.append(t)
        clients.append(c)
    # This process's CPU from the end of the warm-up round to the end of the run, per round after it.
    while any(t.is_alive() for t in threads) and min(len(c.rounds_done) for c in clients) < 1:
        time.sleep(0.002)
    cpu0, done0 = time.process_time(), min(len(c.rounds_done) for c in clients)
    for t in threads:
        t.join(timeout=600)
    _report_cpu(time.process_time() - cpu0, min(len(c.rounds_done) for c in clients) - done0)


def _report_cpu(seconds: float, rounds: int) -> None:
    print(json.dumps({"cpu_s": seconds, "rounds": rounds}), flush=True)


def _clients_cpu_ms(gens: list[subprocess.Popen[str]]) -> float:
    """Load-generator CPU per round (ms), summed over the processes (see :func:`_report_cpu`)."""
    total = 0.0
    for g in gens:
        out, _ = g.communicate(timeout=60)
        got = json.loads(out.strip().splitlines()[-1])
        total += got["cpu_s"] / max(1, got["rounds"])
    return 1000 * total


def _raw(b: bytes) -> bytes:
    return b


def floor_server(port: int, clients: int, rounds: int, down: int, up: int) -> None:
    """The bare gRPC exchange (see the module docstring); prints the round wall times as JSON."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    keep_freed_buffers()  # as fedloom's processes do: the floor is the best bare exchange
    blob = os.urandom(down)
    cond = threading.Condition()
    state = {"round": 0, "got": 0, "t0": 0.0, "cpu0": 0.0}
    walls: list[float] = []
    cpus: list[float] = []

    def task(request: bytes, context: object) -> bytes:
        want = int(request)
        if want == 0:  # the first contact (fedloom's Join)
            return b"joined"
        with cond:
            cond.wait_for(lambda: state["round"] >= want, timeout=60)
        return blob

    def push(request: bytes, context: object) -> bytes:
        if len(request) != up:
            raise ValueError(f"upload of {len(request)} bytes, expected {up}")
        with cond:
            state["got"] += 1
            if state["got"] == clients:
                walls.append(time.perf_counter() - state["t0"])
                cpus.append(time.process_time() - state["cpu0"])
                state.update(
                    got=0, round=state["round"] + 1, t0=time.perf_counter(), cpu0=time.process_time()
                )
                cond.notify_all()
        return b"ok"

    limit = [
        ("grpc.max_receive_message_length", 2 * max(down, up)),
        ("grpc.max_send_message_length", 2 * max(down, up)),
    ]
    handler = grpc.method_handlers_generic_handler(
        "floor",
        {
            name: grpc.unary_unary_rpc_method_handler(fn, request_deserializer=_raw, response_serializer=_raw)
            for name, fn in (("Task", task), ("Push", push))
        },
    )
    server = grpc.server(ThreadPoolExecutor(max_workers=2 * clients + 8), options=limit)
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    with cond:
        state.update(round=1, t0=time.perf_counter(), cpu0=time.process_time())
        cond.notify_all()
    with cond:
        cond.wait_for(lambda: len(walls) >= rounds, timeout=600)
    print(json.dumps({"walls": walls, "cpus": cpus}), flush=True)
    server.stop(grace=0.5).wait()


def floor_worker(port: int, n: int, rounds: int, up: int) -> None:
    """``n`` bare clients as threads (one channel each, as NetClient has)."""
    import grpc

    torch.set_num_threads(1)
    keep_freed_buffers()
    payload = os.urandom(up)
    limit = [
        ("grpc.max_receive_message_length", 4 * up + (1 << 20)),
        ("grpc.max_send_message_length", 4 * up + (1 << 20)),
    ]

    warm = threading.Barrier(n + 1)

    def one() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=limit) as ch:
            task = ch.unary_unary("/floor/Task", request_serializer=_raw, response_deserializer=_raw)
            push = ch.unary_unary("/floor/Push", request_serializer=_raw, response_deserializer=_raw)
            task(b"0", timeout=60, wait_for_ready=True)
            for r in range(1, rounds + 1):
                task(str(r).encode(), timeout=60)
                push(payload, timeout=60)
                if r == 1:
                    warm.wait(timeout=60)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    warm.wait(timeout=60)  # as the fedloom worker: measured from the end of the warm-up round
    cpu0 = time.process_time()
    for t in threads:
        t.join(timeout=600)
    _report_cpu(time.process_time() - cpu0, rounds - 1)


def run_floor(
    clients: int, rounds: int, procs: int, down: int, up: int
) -> tuple[list[float], list[float], float, float]:
    """Round wall times and server CPU times (s) of the bare exchange, warm-up round left out,
    the load generators' CPU per round (ms) and the host's steal (% of the machine's CPU time)."""
    port = _free_port()
    ticks = _cpu_ticks()
    srv = subprocess.Popen(
        [sys.executable, __file__, "--floor-server", str(port), str(clients), str(rounds), str(down), str(up)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    per = -(-clients // procs)
    sizes = [min(per, clients - i) for i in range(0, clients, per)]
    gens = [
        subprocess.Popen(
            [sys.executable, __file__, "--floor-worker", str(port), str(k), str(rounds), str(up)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for k in sizes
    ]
    out, _ = srv.communicate(timeout=600)
    clients_ms = _clients_cpu_ms(gens)
    got = json.loads(out.strip().splitlines()[-1])
    return got["walls"][1:], got["cpus"][1:], clients_ms, _steal_pct(ticks)


def _phases(log: Path) -> list[dict[str, float]]:
    """The server's ``round_committed`` records (with ``ts`` and ``phases``), in order."""
    rows = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    return [r for r in rows if r.get("event") == "round_committed"]


def run(
    clients: int,
    rounds: int,
    relay: bool,
    workdir: Path,
    procs: int,
    hidden: int = 200,
    sets: Sequence[str] = (),
) -> dict[str, float]:
    names = [str(i) for i in range(clients)]
    cfg = workdir / "bench.toml"
    cfg.write_text(
        f"""seed = 0
rounds = {rounds}
[model]
name = "2nn"
kwargs = {{ hidden = {hidden} }}
[sampling]
fraction = 1.0
min_clients = {clients}
[data]
num_clients = {clients}
[eval]
target_accuracy = 0.0
[checkpoint]
keep = 2
[deploy]
clients = {json.dumps(names)}
deadline_s = 60.0
min_quorum = {clients}
heartbeat_s = 5.0
""",
        encoding="utf-8",
    )
    port = _free_port()
    ticks = _cpu_ticks()
    state = workdir / ("srv-relay" if relay else "srv")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    err = (workdir / ("server-relay.log" if relay else "server.log")).open("w")
    srv = subprocess.Popen(
        [sys.executable, "-m", "fedloom", "server", "--config", str(cfg), "--listen", f"127.0.0.1:{port}",
         "--state-dir", str(state), *(x for kv in sets for x in ("--set", kv))],
        env=env, stdout=subprocess.DEVNULL, stderr=err,
    )  # fmt: skip
    target = port
    r = Relay(port) if relay else None
    if r is not None:
        target = r.port
    per = -(-clients // procs)
    gens = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", f"127.0.0.1:{target}", ",".join(names[i : i + per])],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(0, clients, per)
    ]
    srv.wait(timeout=600)
    clients_ms = _clients_cpu_ms(gens)
    err.close()
    metrics = [json.loads(x) for x in (state / "metrics.jsonl").read_text().splitlines()]
    committed = _phases(workdir / ("server-relay.log" if relay else "server.log"))
    # Round 1 warms up (joins, first imports); it is left out of every statistic.
    before_ckpt = [1000 * (m["seconds"] - m["max_client_compute_s"]) for m in metrics[1:]]
    opened = [c["phases"].get("opened_at_s") for c in committed]
    if all(o is not None for o in opened):
        # open to open: everything a round costs, its commit and the gap before the next included
        period = [1000 * (b - a) for a, b in itertools.pairwise(opened[1:])]
        overhead = [p - 1000 * c["max_client_compute_s"] for p, c in zip(period, committed[1:], strict=False)]
    else:  # older builds: open -> checkpoint committed, and the period from the log's timestamps
        period = [1000 * (b["ts"] - a["ts"]) for a, b in itertools.pairwise(committed[1:])]
        overhead = [
            c["phases"]["round_wall_ms"] - 1000 * c["max_client_compute_s"] if "phases" in c else b
            for c, b in zip(committed[1:], before_ckpt, strict=True)
        ]
    raw = Params.from_module(build_model("2nn", {"hidden": hidden}, seed=0)).num_bytes()
    out = {
        "rounds": float(len(metrics)),
        "overhead_ms_median": statistics.median(overhead),
        "overhead_ms_max": max(overhead),
        "overhead_to_aggregate_ms_median": statistics.median(before_ckpt),
        "period_ms_median": statistics.median(period) if period else float("nan"),
        "raw_param_bytes": float(raw),
        "clients_cpu_ms": clients_ms,
        "steal_pct": _steal_pct(ticks),
    }
    for key in committed[1].get("phases", {}):
        out["phase." + key] = statistics.median(float(c["phases"][key]) for c in committed[1:])
    if r is not None:
        per = clients * len(metrics)
        out["down_bytes_per_client_round"] = r.down / per
        out["up_bytes_per_client_round"] = r.up / per
        out["down_ratio"] = r.down / per / raw
        out["up_ratio"] = r.up / per / raw
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument(
        "--procs",
        type=int,
        default=0,
        help="load-generator processes for the clients (0: one per CPU core, at most one per client)",
    )
    ap.add_argument("--no-floor", action="store_true", help="skip the bare-gRPC baseline")
    ap.add_argument("--no-relay", action="store_true", help="skip the second run that counts wire bytes")
    ap.add_argument(
        "--model",
        choices=sorted(MODELS),
        default="2nn",
        help="2nn (199,210 parameters) or 2nn-large (11,388,010)",
    )
    ap.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        help="a config override for the run, e.g. compression.bits=4",
    )
    ap.add_argument(
        "--wire-only", action="store_true", help="only the run through the relay (bytes on the wire)"
    )
    ap.add_argument(
        "--repeats", type=int, default=1, help="fedloom runs, each after a floor run (the machine drifts)"
    )
    ap.add_argument("--worker", nargs=2, metavar=("SERVER", "NAMES"), help=argparse.SUPPRESS)
    ap.add_argument("--floor-server", nargs=5, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--floor-worker", nargs=4, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.procs <= 0:
        args.procs = max(1, min(os.cpu_count() or 1, args.clients))
    if args.worker:
        worker(args.worker[0], args.worker[1].split(","))
        return
    if args.floor_server:
        floor_server(*args.floor_server)
        return
    if args.floor_worker:
        floor_worker(*args.floor_worker)
        return
    torch.set_num_threads(1)
    hidden = MODELS[args.model]
    if args.wire_only:
        with tempfile.TemporaryDirectory() as tmp:
            relayed = run(args.clients, args.rounds, True, Path(tmp), args.procs, hidden, args.sets)
        print(json.dumps(relayed), flush=True)
        _print_wire(args, relayed)
        return
    params = Params.from_module(build_model("2nn", {"hidden": hidden}, seed=0))
    down = len(encode_broadcast(Broadcast(round=1, params=params)))
    up = len(encode_update(ClientUpdate(0, params, 10.0, 10, 1, {"train_loss": 1.0}))[1])
    floor_runs: list[tuple[list[float], list[float], float, float]] = []
    directs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        # Floor, fedloom, floor, fedloom, ..., floor: the machine's drift shows between the floors.
        for i in range(max(1, args.repeats)):
            if not args.no_floor:
                floor_runs.append(run_floor(args.clients, args.rounds, args.procs, down, up))
            workdir = Path(tmp) / f"run{i}"
            workdir.mkdir()
            directs.append(run(args.clients, args.rounds, False, workdir, args.procs, hidden, args.sets))
            print(json.dumps(directs[-1]), flush=True)
        if not args.no_floor:
            floor_runs.append(run_floor(args.clients, args.rounds, args.procs, down, up))
        relayed = (
            None
            if args.no_relay
            else run(args.clients, args.rounds, True, Path(tmp), args.procs, hidden, args.sets)
        )
        took = time.perf_counter() - t0
    floors = [w for walls, _, _, _ in floor_runs for w in walls]
    floor_cpu = [c for _, cpus, _, _ in floor_runs for c in cpus]
    floor_clients = [ms for _, _, ms, _ in floor_runs]
    # The phase breakdown is the median run's.
    direct = sorted(directs, key=lambda d: d["overhead_ms_median"])[len(directs) // 2]
    if len(directs) > 1:
        for i, d in enumerate(directs):
            line = f"run {i + 1}: fedloom overhead median {d['overhead_ms_median']:.1f} ms"
            if floor_runs:
                before, after = (1000 * statistics.median(floor_runs[j][0]) for j in (i, i + 1))
                line += f", floor before/after {before:.1f}/{after:.1f} ms"
            print(line + f", host steal {d['steal_pct']:.1f}%")
    print(f"{args.model} ({direct['raw_param_bytes']:.0f} raw parameter bytes), {args.clients} clients in {args.procs} "
          f"processes, {args.rounds} rounds, {os.cpu_count()} CPUs, {took:.0f} s")  # fmt: skip
    print(
        f"server overhead per round (direct, median run of {len(directs)}): median "
        f"{direct['overhead_ms_median']:.1f} ms, max {direct['overhead_ms_max']:.1f} ms   [target < 50 ms]"
    )
    steal = "  CPU time stolen by the host (VM steal, % of this machine's): fedloom runs " + ", ".join(
        f"{d['steal_pct']:.1f}" for d in directs
    )
    if floor_runs:
        steal += "; floor runs " + ", ".join(f"{f[3]:.1f}" for f in floor_runs)
    print(steal)
    if floors:
        half = len(floors) // 2
        floor = 1000 * statistics.median(floors)
        print(
            f"  bare-gRPC floor (same bytes, same clients, no fedloom): median {floor:.1f} ms "
            f"(first {1000 * statistics.median(floors[:half]):.1f}, second {1000 * statistics.median(floors[half:]):.1f}); "
            f"overhead / floor = {direct['overhead_ms_median'] / floor:.2f}x"
        )
    if "phase.server_cpu_ms" in direct:
        line = f"  server process CPU per round: fedloom {direct['phase.server_cpu_ms']:.1f} ms"
        if floor_cpu:
            line += f", bare-gRPC floor {1000 * statistics.median(floor_cpu):.1f} ms"
        print(line)
    line = f"  load-generator CPU per round (all client processes): fedloom {direct['clients_cpu_ms']:.1f} ms"
    if floor_clients:
        line += f", bare-gRPC floor {statistics.median(floor_clients):.1f} ms"
    print(line)
    print(
        f"  open -> aggregated (metrics 'seconds', no checkpoint): median "
        f"{direct['overhead_to_aggregate_ms_median']:.1f} ms; round period (open -> open): "
        f"median {direct['period_ms_median']:.1f} ms"
    )
    print("  per-phase medians (server log; *_sum = summed over clients, *_at = since round open):")
    for key, value in direct.items():
        if key.startswith("phase.") and key != "phase.opened_at_s":
            print(f"    {key.removeprefix('phase.'):<24} {value:10.2f}")
    if relayed is None:
        return
    _print_wire(args, relayed)
    print(f"overhead through the relay: median {relayed['overhead_ms_median']:.1f} ms")


def _print_wire(args: argparse.Namespace, relayed: dict[str, float]) -> None:
    sets = " ".join(args.sets) or "no compression (target <= 1.05x)"
    print(
        f"{args.model} ({relayed['raw_param_bytes']:.0f} raw parameter bytes), {args.clients} clients, "
        f"{args.rounds} rounds, {sets}: wire bytes per client per round (relay): "
        f"down {relayed['down_bytes_per_client_round']:.0f} ({relayed['down_ratio']:.4f}x raw), "
        f"up {relayed['up_bytes_per_client_round']:.0f} ({relayed['up_ratio']:.4f}x raw)"
    )


if __name__ == "__main__":
    main()
