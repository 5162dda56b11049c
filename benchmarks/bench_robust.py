"""Test accuracy of FedAvg on MNIST under attack, for every robust aggregator.

For each aggregator x attack x attacker fraction, trains FedAvg for a fixed
number of rounds and records the final central test accuracy. Attackers are a
fixed ``fraction`` of the population (``fedloom.attacks.malicious_clients``);
the aggregators that need ``f`` are told the expected number per cohort,
``ceil(fraction * cohort)`` (Bulyan's capped at ``(n - 3) // 4``).

Attacks: sign_flip (-delta), scaling (boost = cohort size, model replacement
at server lr 1), gaussian (N(0, 1) updates), label_flip (y -> 9 - y on the
attackers' data), alie (omniscient "a little is enough" over each round's
outcomes). Every run is configured exactly as a user would, through the
``robust.*`` and ``attack.*`` keys; the data is loaded once. Writes ``robust.csv``,
``robust.md`` and ``robust.png`` to ``--out``.

    python benchmarks/bench_robust.py                       # the full grid
    python benchmarks/bench_robust.py --tiny                # a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import csv
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from fedloom.config import load_config
from fedloom.sim.build import build_components, materialise_config
from fedloom.sim.runner import run_simulation
from fedloom.sim.sampling import cohort_size

AGGREGATORS = [
    "mean",
    "median",
    "trimmed_mean",
    "krum",
    "multi_krum",
    "bulyan",
    "geometric_median",
    "norm_bound",
]
ATTACKS = ["sign_flip", "scaling", "gaussian", "label_flip", "alie"]


def aggregator_options(name: str, n: int, f: int) -> dict[str, Any]:
    f = min(f, (n - 3) // 2)
    return {
        "trimmed_mean": {"beta": min(max(f / n, 0.1), 0.45)},
        "krum": {"f": f},
        "multi_krum": {"f": f, "m": max(n - f, 1)},
        "bulyan": {"f": min(f, (n - 3) // 4)},
        "norm_bound": {"bound": 1.0},
    }.get(name, {})


def run_one(sets: list[str], data: Any, agg: str, attack: str, fraction: float, f: int, n: int) -> float:
    """One run through the real config path: ``robust.*`` and ``attack.*`` keys, as a user sets them."""
    extra = [f"robust.aggregator={agg}", f"robust.options={_toml_table(aggregator_options(agg, n, f))}"]
    if fraction > 0:
        extra += [f"attack.kind={attack}", f"attack.fraction={fraction}", f"attack.boost={float(n)}"]
    cfg = load_config(None, [*sets, *extra])
    with tempfile.TemporaryDirectory() as tmp:
        result = run_simulation(cfg, Path(tmp) / "run", components=build_components(cfg, materialised=data))
    return float(result.final_metrics.get("test_accuracy", math.nan))


def _toml_table(options: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k} = {v}" for k, v in options.items()) + "}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--cohort-fraction", type=float, default=0.2)
    p.add_argument("--model", default="2nn")
    p.add_argument("--train-subset", type=int, default=0)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3])
    p.add_argument("--aggregators", nargs="+", default=AGGREGATORS)
    p.add_argument("--attacks", nargs="+", default=ATTACKS)
    p.add_argument("--data-dir", default="")
    p.add_argument("--out", type=Path, default=Path("bench_out"))
    p.add_argument(
        "--tiny", action="store_true", help="2 rounds, 2000 examples, 20 clients: checks it starts"
    )
    a = p.parse_args()
    if a.tiny:
        a.rounds, a.clients, a.train_subset = 2, 20, 2000
        a.fractions, a.aggregators, a.attacks = [0.0, 0.2], ["mean", "median", "krum"], ["sign_flip", "alie"]
    sets = [
        f"rounds={a.rounds}", f"data.num_clients={a.clients}", "data.partition=iid",
        f"data.train_subset={a.train_subset}", f"sampling.fraction={a.cohort_fraction}",
        f"model.name={a.model}", "client.epochs=1", "client.batch_size=20", "client.lr=0.05",
        f"eval.every={a.rounds}", "eval.target_accuracy=0", f"data.dir={a.data_dir}",
    ]  # fmt: skip
    cfg = load_config(None, sets)
    data = materialise_config(cfg)
    n = cohort_size(cfg.data.num_clients, cfg.sampling.fraction, cfg.sampling.min_clients)
    a.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for agg in a.aggregators:
        clean: float | None = None
        for attack in a.attacks:
            for frac in a.fractions:
                t0 = time.perf_counter()
                if frac == 0 and clean is not None:
                    acc = clean  # no attacker: the attack is irrelevant
                else:
                    acc = run_one(sets, data, agg, attack, frac, math.ceil(frac * n), n)
                    clean = acc if frac == 0 else clean
                rows.append({"aggregator": agg, "attack": attack, "fraction": frac, "accuracy": acc})
                print(f"{agg:17s} {attack:10s} {frac:4.2f}  acc={acc:.4f}  ({time.perf_counter() - t0:.1f}s)")
    with (a.out / "robust.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [f"Final test accuracy after {a.rounds} rounds (cohort {n} of {a.clients}).", ""]
    for attack in a.attacks:
        lines += [f"### {attack}", "", "| aggregator | " + " | ".join(f"{x:.0%}" for x in a.fractions) + " |"]
        lines.append("|---|" + "---|" * len(a.fractions))
        for agg in a.aggregators:
            accs = [r["accuracy"] for r in rows if r["aggregator"] == agg and r["attack"] == attack]
            lines.append(f"| {agg} | " + " | ".join(f"{x:.3f}" for x in accs) + " |")
        lines.append("")
    (a.out / "robust.md").write_text("\n".join(lines))
    fig, axes = plt.subplots(1, len(a.attacks), figsize=(4 * len(a.attacks), 3.5), sharey=True, squeeze=False)
    for ax, attack in zip(axes[0], a.attacks, strict=True):
        for agg in a.aggregators:
            accs = [r["accuracy"] for r in rows if r["aggregator"] == agg and r["attack"] == attack]
            ax.plot(a.fractions, accs, marker="o", label=agg)
        ax.set_title(attack)
        ax.set_xlabel("attacker fraction")
    axes[0][0].set_ylabel("test accuracy")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out / "robust.png", dpi=120)
    print(f"wrote {a.out}/robust.csv, robust.md, robust.png")


if __name__ == "__main__":
    main()
