"""Privacy-utility curve of DP-FedAvg on MNIST: final test accuracy against client-level ε.

For each target ε, calibrates the noise multiplier for ``--rounds`` rounds of
fixed-size cohorts (``FixedSizeSampling``, RDP accountant, replace-one
neighbours) at δ = ``--delta``, trains with :class:`~fedloom.transforms.dp.CentralDP`
(server-side clipping to ``--clip``, uniform weights, noise on the sum) and
records the final test accuracy; ``inf`` is the same clipped, uniform-weight
pipeline without noise. Writes ``dp_utility.csv``, ``dp_utility.md`` and
``dp_utility.png`` to ``--out``.

Client-level DP needs large cohorts: the noise std on the mean is σC / m, so
the defaults use 1000 clients, cohorts of 100 and a small model.

    python benchmarks/bench_dp_utility.py
    python benchmarks/bench_dp_utility.py --tiny
"""

from __future__ import annotations

import argparse
import csv
import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from fedloom.config import load_config
from fedloom.privacy import FixedSizeSampling, PrivacyLedger, calibrate_noise_multiplier
from fedloom.sim.build import build_components
from fedloom.sim.runner import run_simulation
from fedloom.sim.sampling import cohort_size
from fedloom.transforms.dp import CentralDP
from fedloom.transforms.pipeline import Pipeline


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epsilons", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0, 8.0, math.inf])
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--cohort-fraction", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=0.5)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--model", default="logreg")
    p.add_argument("--train-subset", type=int, default=0)
    p.add_argument("--data-dir", default="")
    p.add_argument("--out", type=Path, default=Path("bench_out"))
    p.add_argument("--tiny", action="store_true", help="2 rounds, 2000 examples: checks it starts")
    a = p.parse_args()
    if a.tiny:
        a.rounds, a.clients, a.train_subset, a.epsilons = 2, 100, 2000, [2.0, math.inf]
    sets = [
        f"rounds={a.rounds}", f"data.num_clients={a.clients}", "data.partition=iid",
        f"data.train_subset={a.train_subset}", f"sampling.fraction={a.cohort_fraction}",
        f"model.name={a.model}", "client.epochs=1", "client.batch_size=10", "client.lr=0.1",
        f"eval.every={a.rounds}", "eval.target_accuracy=0", f"data.dir={a.data_dir}",
    ]  # fmt: skip
    cfg = load_config(None, sets)
    comps = build_components(cfg)
    m = cohort_size(comps.train.num_clients, cfg.sampling.fraction, cfg.sampling.min_clients)
    sampling = FixedSizeSampling(cohort=m, population=comps.train.num_clients)
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for eps in a.epsilons:
        t0 = time.perf_counter()
        if math.isinf(eps):
            sigma, spent = 0.0, math.inf
        else:
            sigma = calibrate_noise_multiplier(eps, a.delta, a.rounds, sampling, rtol=1e-2)
            spent = PrivacyLedger(sigma, sampling, a.delta).epsilon_after(a.rounds)
        stage = CentralDP(clip_norm=a.clip, noise_multiplier=sigma, expected_clients=m)
        c = replace(comps, pipeline=Pipeline((stage,)))
        with tempfile.TemporaryDirectory() as tmp:
            res = run_simulation(cfg, Path(tmp) / "run", components=c)
        acc = float(res.final_metrics.get("test_accuracy", math.nan))
        rows.append({"target_epsilon": eps, "epsilon": spent, "noise_multiplier": sigma, "accuracy": acc})
        print(
            f"eps={eps:>5}  sigma={sigma:.3f}  spent={spent:.3f}  noise std on mean={sigma * a.clip / m:.2e}  "
            f"acc={acc:.4f}  ({time.perf_counter() - t0:.1f}s)"
        )
    with (a.out / "dp_utility.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [
        f"DP-FedAvg, {a.rounds} rounds, cohort {m} of {comps.train.num_clients}, clip {a.clip}, "
        f"delta {a.delta}, RDP accountant, fixed-size sampling.",
        "",
        "| target ε | ε spent | σ | test accuracy |",
        "|---|---|---|---|",
        *(
            f"| {r['target_epsilon']} | {r['epsilon']:.3f} | {r['noise_multiplier']:.3f} | {r['accuracy']:.4f} |"
            for r in rows
        ),
    ]
    (a.out / "dp_utility.md").write_text("\n".join(lines) + "\n")
    finite = [r for r in rows if math.isfinite(r["target_epsilon"])]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["epsilon"] for r in finite], [r["accuracy"] for r in finite], marker="o", label="DP-FedAvg")
    for r in rows:
        if not math.isfinite(r["target_epsilon"]):
            ax.axhline(r["accuracy"], linestyle="--", color="grey", label="no noise (clipped)")
    ax.set_xscale("log")
    ax.set_xlabel(f"client-level ε (δ = {a.delta:g})")
    ax.set_ylabel("test accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(a.out / "dp_utility.png", dpi=120)
    print(f"wrote {a.out}/dp_utility.csv, dp_utility.md, dp_utility.png")


if __name__ == "__main__":
    main()
