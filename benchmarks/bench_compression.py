"""Compression: wire bytes per client per round, both directions, and accuracy against cumulative bytes.

Part ``wire``: for the McMahan 2NN (784-200-200-10, 199,210 parameters) and a large 2NN
(784-3000-3000-10, 11,388,010 parameters), one client update (a random delta of scale 1e-3:
no codec's size depends on the values) is run through each codec's client side and
encoded with the deployment's wire codec (:func:`fedloom.net.wire.encode_update`: the blob plus
its JSON header, what the server receives in the upload message's fields), and the broadcast with
:func:`fedloom.net.wire.encode_broadcast` under each ``compression.downlink``. Ratios are against
the same messages without compression, encoded in the same run. gRPC/HTTP2 framing (about 0.1%,
see bench_net.py) is not included. Targets: <= 0.26x at 8 bits, <= 0.14x at 4 bits, <= 0.03x for
top-1% with indices.

Part ``accuracy``: every codec runs the same rounds from the same seed in the sequential
simulation, which counts ``bytes_up`` and ``bytes_down`` per round from the packed tensors
(headers excluded). Prints rounds and cumulative bytes (both directions) to the target accuracy,
writes a JSON of the curves and a plot of accuracy against cumulative bytes. Workloads
(``--workload``):

* ``mnist``: MNIST 2NN, 100 clients with Dirichlet(0.3) label skew, 10 clients a round, one
  local epoch of batch 10 at lr 0.05; central test accuracy;
* ``shakespeare``: LEAF's Shakespeare (850 roles) with its stacked LSTM (819,920 parameters),
  FedAvg with 10 roles a round, 20 local steps of batch 10 at lr 1.47 (the reduced setting of
  ``repro_shakespeare.py``); per-role next-character accuracy on 3 test windows a role,
  example-weighted (``site_accuracy``).

Run::

    PYTHONPATH=src nice -n 19 .venv/bin/python benchmarks/bench_compression.py wire
    PYTHONPATH=src nice -n 19 .venv/bin/python benchmarks/bench_compression.py accuracy --rounds 40 --target 0.9
    PYTHONPATH=src nice -n 19 .venv/bin/python benchmarks/bench_compression.py accuracy --workload shakespeare \
        --rounds 30 --every 5 --target 0.25
    PYTHONPATH=src .venv/bin/python benchmarks/bench_compression.py table --targets 0.9 0.95
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fedloom.algorithms.api import Broadcast, ClientUpdate, ServerContext
from fedloom.config import load_config
from fedloom.core.params import Params
from fedloom.models.zoo import build_model
from fedloom.net.wire import encode_broadcast, encode_patch, encode_update
from fedloom.sim.build import build_components, build_pipeline, materialise_config
from fedloom.sim.runner import run_simulation
from fedloom.transforms.pipeline import bind_model

UPLINK = {
    "fp32 (none)": [],
    "fp16": ["compression.codec=fp16"],
    "bf16": ["compression.codec=bf16"],
    "qsgd 8-bit": ["compression.codec=qsgd", "compression.bits=8"],
    "qsgd 4-bit": ["compression.codec=qsgd", "compression.bits=4"],
    "qsgd 4-bit, block 256": ["compression.codec=qsgd", "compression.bits=4", "compression.block=256"],
    "qsgd 2-bit": ["compression.codec=qsgd", "compression.bits=2"],
    "top-1% + EF": ["compression.codec=topk", "compression.fraction=0.01"],
    "top-10% + EF": ["compression.codec=topk", "compression.fraction=0.1"],
    "rand-10% + EF": ["compression.codec=randk", "compression.fraction=0.1"],
}
DOWNLINK = ["none", "fp16", "bf16", "q8"]
MODELS = {"2nn": 200, "2nn-large": 3000}


def wire(args: argparse.Namespace) -> None:
    print("| model | parameters | uplink codec | bytes up / client / round | ratio |")
    print("|---|---|---|---|---|")
    down_rows: list[str] = []
    patch_rows: list[str] = []
    for name, hidden in MODELS.items():
        module = build_model("2nn", {"hidden": hidden}, seed=0)
        params = Params.from_module(module)
        gen = torch.Generator().manual_seed(1)
        delta = Params({k: torch.randn(v.shape, generator=gen) * 1e-3 for k, v in params.items()})
        update = ClientUpdate(0, delta, 600.0, 600, 60, metrics={"train_loss": 0.5})
        ctx = ServerContext(seed=0, round=1, population=100)
        base = 0
        for label, sets in UPLINK.items():
            cfg = load_config(None, sets)
            sent = build_pipeline(cfg).client(update, ctx)
            meta, blob = encode_update(sent)
            size = len(blob) + len(meta.encode())
            base = base or size
            print(f"| {name} | {params.num_elements():,} | {label} | {size:,} | {size / base:.4f} |")
        b = Broadcast(round=1, params=params)
        fp32 = len(encode_broadcast(b))
        for mode in DOWNLINK:
            size = len(encode_broadcast(b, mode))  # type: ignore[arg-type]
            down_rows.append(f"| {name} | {mode} | {size:,} | {size / fp32:.4f} |")
        patch_rows += _patch_rows(name, params, ctx)
    print("\n| model | downlink | bytes down / client / round | ratio |")
    print("|---|---|---|---|")
    print("\n".join(down_rows))
    print(
        "\n| model | round's aggregate | downlink | patch bytes to a client holding the last broadcast | ratio |"
    )
    print("|---|---|---|---|---|")
    print("\n".join(patch_rows))


def _patch_rows(name: str, params: Params, ctx: ServerContext) -> list[str]:
    """``compression.downlink_patch``: the next broadcast as a patch against this one, after a round
    whose aggregate is the mean of 10 clients' top-1% updates (random deltas of scale 1e-3), or of
    10 dense updates; against the whole next broadcast of the same encoding (no patch: 1.0)."""
    rows = []
    gen = torch.Generator().manual_seed(2)
    pipeline = bind_model(build_pipeline(load_config(None, UPLINK["top-1% + EF"])), params)
    sparse, dense = params.zeros_like(), params.zeros_like()
    for cid in range(10):
        delta = Params({k: torch.randn(v.shape, generator=gen) * 1e-3 for k, v in params.items()})
        dense = dense.add_scaled(delta, 0.1)
        sent = pipeline.client(ClientUpdate(cid, delta, 1.0, 1, 1), ctx)
        sparse = sparse.add_scaled(pipeline.decode(sent, ctx).delta, 0.1)
    for label, agg in (("10 x top-1%", sparse), ("10 x dense", dense)):
        after = params.add_scaled(agg, 1.0)
        for mode in DOWNLINK:
            held = encode_broadcast(Broadcast(round=1, params=params), mode)  # type: ignore[arg-type]
            whole = encode_broadcast(Broadcast(round=2, params=after), mode)  # type: ignore[arg-type]
            patch = encode_patch(whole, held)
            size = len(patch) if patch is not None else len(whole)
            rows.append(f"| {name} | {label} | {mode} | {size:,} | {size / len(whole):.4f} |")
    return rows


ACC_BASE = (
    "data.partition=dirichlet",
    "data.alpha=0.3",
    "data.num_clients=100",
    "sampling.fraction=0.1",
    "client.epochs=1",
    "client.batch_size=10",
    "client.lr=0.05",
    "eval.target_accuracy=0",
    "checkpoint.keep=1",
    "executor=sequential",
    "seed=1",
)
ACC_CODECS: dict[str, list[str]] = {
    **UPLINK,
    "qsgd 8-bit, downlink q8": ["compression.codec=qsgd", "compression.bits=8", "compression.downlink=q8"],
    "qsgd 4-bit, downlink q8": ["compression.codec=qsgd", "compression.bits=4", "compression.downlink=q8"],
}
SHAKESPEARE_BASE = (
    "data.dataset=shakespeare",
    "data.num_clients=850",
    "data.test_subset=3",
    "algorithm.name=fedavg",
    "client.lr=1.47",
    "client.batch_size=10",
    "client.steps=20",
    f"sampling.fraction={10 / 850}",
    "sampling.min_clients=10",
    "eval.target_accuracy=0",
    "checkpoint.keep=1",
    "executor=sequential",
    "seed=0",
)
# Each Shakespeare run costs minutes of CPU: a subset of the codecs, the ones MNIST separates.
SHAKESPEARE_CODECS = [
    "fp32 (none)",
    "fp16",
    "qsgd 8-bit",
    "qsgd 4-bit",
    "qsgd 2-bit",
    "top-1% + EF",
    "top-10% + EF",
    "qsgd 4-bit, downlink q8",
]
WORKLOADS: dict[str, dict[str, Any]] = {
    "mnist": {
        "base": ACC_BASE,
        "codecs": list(ACC_CODECS),
        "metric": "test_accuracy",
        "json": "compression_accuracy.json",
        "title": "MNIST 2NN, Dirichlet(0.3), 100 clients, 10 per round",
        "ylim": (0.5, 1.0),
    },
    "shakespeare": {
        "base": SHAKESPEARE_BASE,
        "codecs": SHAKESPEARE_CODECS,
        "metric": "site_accuracy",
        "json": "compression_accuracy_shakespeare.json",
        "title": "Shakespeare (LEAF, 850 roles), LSTM, 10 roles per round",
        "ylim": (0.0, 0.5),
    },
}


def accuracy(args: argparse.Namespace) -> None:
    work = WORKLOADS[args.workload]
    torch.set_num_threads(1)  # a shared machine: one core, the same for every codec
    base = [*work["base"], f"rounds={args.rounds}", f"eval.every={args.every}"]
    mat = materialise_config(load_config(None, base))
    fp32_bytes = Params.from_module(mat.workspace.module).num_bytes()
    curves: dict[str, Any] = {}
    only = set(args.only) if args.only else None
    out = Path(args.out)
    for label in work["codecs"]:
        if only and label not in only:
            continue
        cfg = load_config(None, [*base, *ACC_CODECS[label]])
        comps = build_components(cfg, materialised=mat)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            run_simulation(cfg, Path(tmp) / "run", components=comps)
            rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
        cum, points = 0, []
        for m in rows:
            up = m.get("bytes_up", fp32_bytes * m["num_clients"])
            down = m.get("bytes_down", fp32_bytes * m["num_clients"])
            cum += up + down
            if m.get(work["metric"]) is not None:
                points.append((m["round"], cum, m[work["metric"]]))
        hit = next((p for p in points if p[2] >= args.target), None)
        curves[label] = {"points": points, "to_target": hit, "seconds": time.perf_counter() - t0}
        out.mkdir(parents=True, exist_ok=True)
        (out / work["json"]).write_text(json.dumps(curves, indent=1))  # after every codec
        reach = f"round {hit[0]}, {hit[1] / 1e6:.1f} MB" if hit else "not reached"
        print(
            f"{label}: final accuracy {points[-1][2]:.4f}, {points[-1][1] / 1e6:.1f} MB total; target: {reach}",
            flush=True,
        )
    _table(curves, [args.target])
    _plot(curves, args.target, out / work["json"], work)


def _plot(curves: dict[str, Any], target: float, json_path: Path, work: dict[str, Any]) -> None:
    """Accuracy against cumulative bytes (log scale), one line per codec, next to the JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colours = plt.get_cmap("tab20")
    for i, (label, c) in enumerate(curves.items()):
        xs = [p[1] / 1e6 for p in c["points"]]
        ys = [p[2] for p in c["points"]]
        style = "--" if "downlink" in label else "-"
        ax.plot(xs, ys, style, label=label, linewidth=1.3, color=colours(i % 20))
    ax.set_xscale("log")
    ax.set_ylim(*work["ylim"])
    ax.set_xlabel("cumulative bytes, both directions (MB, log scale)")
    ax.set_ylabel("test accuracy")
    ax.axhline(target, color="grey", linestyle=":", linewidth=0.8)
    ax.set_title(work["title"])
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    png = json_path.with_suffix(".png")
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def _table(curves: dict[str, Any], targets: list[float]) -> None:
    """Rounds and cumulative MB (both directions) to each target accuracy, per codec."""
    heads = " | ".join(f"rounds to {t:.0%} | MB to {t:.0%}" for t in targets)
    print(f"\n| codec | {heads} | final accuracy | rounds | MB in all |")
    print("|---|" + "---|---|" * len(targets) + "---|---|---|")
    for label, c in curves.items():
        cells = []
        for t in targets:
            hit = next((p for p in c["points"] if p[2] >= t), None)
            cells += [str(hit[0]) if hit else "-", f"{hit[1] / 1e6:.1f}" if hit else "-"]
        last = c["points"][-1]
        print(f"| {label} | {' | '.join(cells)} | {last[2]:.4f} | {last[0]} | {last[1] / 1e6:.1f} |")


def table(args: argparse.Namespace) -> None:
    work = WORKLOADS[args.workload]
    path = Path(args.json or Path("docs/results") / work["json"])
    curves = json.loads(path.read_text())
    _table(curves, args.targets)
    if args.plot:
        _plot(curves, args.targets[0], path, work)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="part", required=True)
    sub.add_parser("wire")
    a = sub.add_parser("accuracy")
    a.add_argument("--workload", choices=sorted(WORKLOADS), default="mnist")
    a.add_argument("--rounds", type=int, default=60)
    a.add_argument("--every", type=int, default=2)
    a.add_argument("--target", type=float, default=0.9)
    a.add_argument("--only", nargs="*", default=None)
    a.add_argument("--out", default="docs/results")
    t = sub.add_parser("table", help="the accuracy table for other targets, from the accuracy part's JSON")
    t.add_argument("--workload", choices=sorted(WORKLOADS), default="mnist")
    t.add_argument(
        "--json", default="", help="the accuracy part's JSON (default: the workload's in docs/results)"
    )
    t.add_argument("--targets", type=float, nargs="+", default=[0.9, 0.95])
    t.add_argument("--plot", action="store_true", help="draw the plot again from the JSON")
    args = p.parse_args()
    {"wire": wire, "accuracy": accuracy, "table": table}[args.part](args)


if __name__ == "__main__":
    main()
