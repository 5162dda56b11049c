"""``fedloom report``: plots, a markdown summary and a self-contained HTML report of runs.

Reads simulation run directories (``fedloom simulate``) and deployment state directories
(``fedloom server --state-dir``), finished or still running, through
:func:`fedloom.results.run_data.load_run` (``metrics.jsonl``, ``events.jsonl`` where
present, the state database read-only). :func:`write_report` writes into ``out_dir``:

* ``accuracy.png``: test accuracy against round, runs overlaid (and the sites'
  example-weighted accuracy, dashed, where sites evaluated), with a dashed line at each
  configured ``eval.target_accuracy`` above 0;
* ``loss.png``: train loss (left) and test loss (right) against round, runs overlaid;
* for each run (file names prefixed ``runN-`` when there are several), where the run
  recorded the data: ``sites.png`` (each site's metric on its own test split),
  ``site-distribution.png`` (min/p10/median/max across sites and the weighted mean),
  ``privacy.png`` (epsilon spent against the budget), ``participation.png`` (accepted,
  rejected and dropped clients per round) and ``bytes.png`` (bytes per round);
* ``summary.md``: one table row per run (see :class:`RunSummary`), then per run its last
  round's metrics, the per-site table and distribution, privacy spent, participation per
  round with the reasons for rejections and dropouts, and bytes per round;
* ``report.html``: the same content as one self-contained file (images inlined).

The numbers come from the pure function :func:`summarize_run`; labels from :func:`run_labels`.
Plots are drawn by :mod:`fedloom.results.plots`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedloom.core.errors import RunStateError
from fedloom.results.document import Block, Bullets, Heading, Image, Para, Table, to_html, to_markdown
from fedloom.results.plots import (
    PlotRun,
    plot_accuracy,
    plot_bytes,
    plot_loss,
    plot_participation,
    plot_privacy,
    plot_site_curves,
    plot_site_distribution,
)
from fedloom.results.run_data import RoundActivity, RunData, load_run

__all__ = ["Report", "RunReport", "RunSummary", "run_labels", "summarize_run", "write_report"]

_REQUIRED = ("round", "seconds")
# Present in every row; null in a round that trained nobody (an empty Poisson cohort).
_NULLABLE = ("train_loss",)
_OPTIONAL = ("test_accuracy", "test_loss", "fed_accuracy", "fed_loss", "site_accuracy", "num_clients")
# Keys that differ between runs without describing the experiment; never used in labels.
_LABEL_IGNORED = frozenset({"out_dir", "data.dir"})
_LABEL_MAX_KEYS = 3
_MAX_REASONS_SHOWN = 5


@dataclass(frozen=True)
class RunSummary:
    """Headline numbers of one run; accuracies are fractions in [0, 1], times in seconds.

    ``final_accuracy`` is the test accuracy of the last evaluated round (a run evaluated only on
    its sites' own test splits: their example-weighted ``site_accuracy``). The accuracy
    fields and ``best_round`` are None when no round was evaluated; ``rounds_to_target``
    is the first round whose test accuracy is >= the target, None when not reached or
    when no target (target <= 0) is configured.
    """

    rounds_run: int
    final_accuracy: float | None
    best_accuracy: float | None
    best_round: int | None
    rounds_to_target: int | None
    total_seconds: float
    mean_seconds: float


@dataclass(frozen=True)
class RunReport:
    """One run as shown in the report: its label, key config values and summary."""

    run_dir: Path
    label: str
    algorithm: str
    model: str
    partition: str
    target: float
    summary: RunSummary


@dataclass(frozen=True)
class Report:
    """What :func:`write_report` wrote (``paths``, in writing order) and the per-run rows."""

    paths: tuple[Path, ...]
    runs: tuple[RunReport, ...]


def _as_float(value: object) -> float | None:
    """``value`` as a float, or None when it is not a number (bools are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _number(row: Mapping[str, object], key: str) -> float | None:
    """``row[key]`` as a float, or None when absent, null or not a number."""
    return _as_float(row.get(key))


def _row_problems(row: object) -> list[str]:
    """Everything wrong with one metrics row; empty when it is usable."""
    if not isinstance(row, dict):
        return [f"expected a JSON object, got {type(row).__name__}"]
    problems = [f"'{key}' missing or not a number" for key in _REQUIRED if _number(row, key) is None]
    problems += [
        f"'{key}' missing or not a number (or null)"
        for key in _NULLABLE
        if key not in row or (row[key] is not None and _number(row, key) is None)
    ]
    problems += [
        f"'{key}' = {row[key]!r} is not a number"
        for key in _OPTIONAL
        if row.get(key) is not None and _number(row, key) is None
    ]
    rnd = row.get("round")
    if not problems and (not isinstance(rnd, int) or rnd < 1):
        problems.append(f"'round' = {rnd!r} is not an integer >= 1")
    return problems


def _canonical(metrics: Sequence[Mapping[str, object]]) -> list[Mapping[str, object]]:
    """Rows sorted by round; a round logged twice (a resumed run) keeps its last row."""
    by_round: dict[int, Mapping[str, object]] = {}
    for i, row in enumerate(metrics):
        problems = _row_problems(row)
        if problems:
            raise ValueError(f"metrics row {i}: " + "; ".join(problems))
        by_round[int(_number(row, "round") or 0)] = row
    return [by_round[r] for r in sorted(by_round)]


def summarize_run(metrics: Sequence[Mapping[str, object]], target: float) -> RunSummary:
    """Summarise one run's per-round metrics.

    Args:
        metrics: rows as in ``metrics.jsonl``: ``round`` (int >= 1), ``train_loss`` and
            ``seconds`` are required; ``test_accuracy`` is read where present. Order does
            not matter; a duplicated round counts once (its last row).
        target: the target test accuracy; <= 0 means none is configured.

    Returns:
        ``rounds_run`` is the last round logged, ``mean_seconds`` the mean over logged rounds.

    Raises:
        ValueError: ``metrics`` is empty or a row lacks a required key.
    """
    rows = _canonical(metrics)
    if not rows:
        raise ValueError("metrics is empty: a run needs at least one round to summarise")
    rounds = [int(_number(r, "round") or 0) for r in rows]
    seconds = [_number(r, "seconds") or 0.0 for r in rows]
    key = _accuracy_key(rows)
    evaluated = [
        (rnd, acc)
        for rnd, row in zip(rounds, rows, strict=True)
        if (acc := _number(row, key)) is not None and math.isfinite(acc)
    ]
    best = max(evaluated, key=lambda ra: ra[1], default=None)  # max keeps the earliest tie
    reached = (rnd for rnd, acc in evaluated if acc >= target) if target > 0 else iter(())
    return RunSummary(
        rounds_run=rounds[-1],
        final_accuracy=evaluated[-1][1] if evaluated else None,
        best_accuracy=best[1] if best else None,
        best_round=best[0] if best else None,
        rounds_to_target=next(reached, None),
        total_seconds=sum(seconds),
        mean_seconds=sum(seconds) / len(seconds),
    )


def _accuracy_key(rows: Sequence[Mapping[str, object]]) -> str:
    """``test_accuracy``, or ``site_accuracy`` for a run whose only evaluation is on the sites' own splits."""
    if any(_number(r, "test_accuracy") is not None for r in rows):
        return "test_accuracy"
    return "site_accuracy" if any(_number(r, "site_accuracy") is not None for r in rows) else "test_accuracy"


def _flatten(table: Mapping[str, object], prefix: str = "") -> dict[str, object]:
    """Nested TOML tables as dotted keys: ``{"client": {"lr": 0.1}}`` -> ``{"client.lr": 0.1}``."""
    flat: dict[str, object] = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _show(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int | str):
        return str(value)
    return json.dumps(value, separators=(",", ":"), default=str)


def run_labels(names: Sequence[str], configs: Sequence[Mapping[str, object]]) -> list[str]:
    """Legend labels: each name, plus with several runs the config keys that differ.

    Example: ``run-a (client.lr=0.1)``. At most three keys are shown (sorted), then
    ``+N more``; path-like keys (``out_dir``, ``data.dir``) are never shown. Labels that
    would still collide get `` [2]``, `` [3]``… appended so the legend stays unambiguous.
    """
    if len(names) != len(configs):
        raise ValueError(f"got {len(names)} names but {len(configs)} configs")
    flats = [_flatten(c) for c in configs]
    keys = sorted({k for f in flats for k in f} - _LABEL_IGNORED)
    missing = object()
    differing = [k for k in keys if len({_show(f.get(k, missing)) for f in flats}) > 1]
    labels: list[str] = []
    for name, flat in zip(names, flats, strict=True):
        parts = [f"{k}={_show(flat[k]) if k in flat else 'unset'}" for k in differing[:_LABEL_MAX_KEYS]]
        if len(differing) > _LABEL_MAX_KEYS:
            parts.append(f"+{len(differing) - _LABEL_MAX_KEYS} more")
        labels.append(f"{name} ({', '.join(parts)})" if parts else name)
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            labels[i] = f"{label} [{seen[label]}]"
    return labels


def _get(config: Mapping[str, object], dotted: str) -> object:
    node: object = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _fmt(value: object) -> str:
    """A metrics value as shown in the tables: integers as they are, floats to 6 significant digits."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _overview(runs: Sequence[RunReport]) -> Table:
    header = (
        "run", "algorithm", "model", "partition", "rounds", "final acc", "best acc (round)",
        "rounds to target", "total s", "mean s/round",
    )  # fmt: skip
    rows = []
    for run in runs:
        s = run.summary
        acc = "—" if s.final_accuracy is None else f"{s.final_accuracy:.4f}"
        best = "—" if s.best_accuracy is None else f"{s.best_accuracy:.4f} (round {s.best_round})"
        if run.target <= 0:
            to_target = "no target"
        elif s.rounds_to_target is None:
            to_target = f"not reached ({run.target:g})"
        else:
            to_target = f"{s.rounds_to_target} ({run.target:g})"
        rows.append(
            (
                run.label,
                run.algorithm,
                run.model,
                run.partition,
                str(s.rounds_run),
                acc,
                best,
                to_target,
                f"{s.total_seconds:.2f}",
                f"{s.mean_seconds:.3f}",
            )
        )
    return Table(header, tuple(rows))


def _site_metric(rows: Sequence[Mapping[str, object]]) -> str | None:
    """The metric the per-site plots show: accuracy where the sites report it, else their first metric."""
    names = sorted(
        {
            k[len("site_") : -len("_median")]
            for r in rows
            for k in r
            if k.startswith("site_") and k.endswith("_median")
        }
    )
    if not names:
        return None
    return "accuracy" if "accuracy" in names else names[0]


def _reasons(pairs: Sequence[tuple[str, str]]) -> str:
    shown = [f"{client}: {reason[:200]}" for client, reason in pairs[:_MAX_REASONS_SHOWN]]
    if len(pairs) > len(shown):
        shown.append(f"... and {len(pairs) - len(shown)} more")
    return "; ".join(shown)


@dataclass(frozen=True)
class _LoadedRun:
    report: RunReport
    data: RunData
    rows: list[Mapping[str, object]]


def _run_blocks(run: _LoadedRun, out_dir: Path, prefix: str) -> tuple[list[Block], list[Path]]:
    """The per-run sections of the report, and the plots they show (written here)."""
    data, rows, label = run.data, run.rows, run.report.label
    last = rows[-1]
    blocks: list[Block] = [Heading(label, 2)]
    status = f"status {data.status}" if data.status else "status unknown"
    blocks.append(
        Para(
            f"{data.kind} run in {data.run_dir} ({status}); {len(rows)} rounds committed, the last round "
            f"{_fmt(last.get('round'))}; participation read from {data.activity_source}."
        )
    )
    paths: list[Path] = []

    def image(name: str, alt: str) -> Image:
        path = out_dir / f"{prefix}{name}"
        paths.append(path)
        return Image(path, alt)

    scalars = tuple(
        (k, _fmt(v)) for k, v in last.items() if v is None or isinstance(v, int | float | str | bool)
    )
    blocks += [
        Heading(f"Last round's metrics (round {_fmt(last.get('round'))})", 3),
        Table(("metric", "value"), scalars),
    ]

    metric = _site_metric(rows)
    if metric is not None:
        evaluated = [(r, sites) for r in rows if isinstance(sites := r.get("sites"), Mapping)]
        blocks.append(Heading(f"Per-site evaluation ({metric})", 3))
        if evaluated:
            latest, sites = evaluated[-1]
            per_site = {str(k): v for k, v in sites.items() if isinstance(v, Mapping)}
            names = sorted({k for v in per_site.values() for k in v} - {"num_examples", "loss"})
            header = ("site", "examples", "loss", *names)
            table = tuple(
                (site, _fmt(v.get("num_examples")), _fmt(v.get("loss")), *(_fmt(v.get(n)) for n in names))
                for site, v in per_site.items()
            )
            blocks += [
                Para(f"Each site's own test split, round {_fmt(latest.get('round'))}."),
                Table(header, table),
            ]
        dist = tuple(
            (
                str(r.get("round")),
                *(
                    _fmt(r.get(f"site_{metric}{suffix}"))
                    for suffix in ("", "_min", "_p10", "_median", "_max")
                ),
            )
            for r in rows
            if f"site_{metric}_median" in r
        )
        blocks.append(Table(("round", "weighted mean", "min", "p10", "median", "max"), dist))
        plot_site_curves(rows, metric, out_dir / f"{prefix}sites.png")
        blocks.append(image("sites.png", f"{label}: per-site {metric}"))
        plot_site_distribution(rows, metric, out_dir / f"{prefix}site-distribution.png")
        blocks.append(image("site-distribution.png", f"{label}: {metric} across sites"))

    if data.epsilon:
        r_last, eps = data.epsilon[-1]
        budget = f"of the budget {data.budget:g}" if data.budget > 0 else "(no budget configured)"
        blocks += [Heading("Privacy", 3), Para(f"epsilon spent after round {r_last}: {eps:.6g} {budget}.")]
        plot_privacy(data.epsilon, data.budget, out_dir / f"{prefix}privacy.png")
        blocks.append(image("privacy.png", f"{label}: epsilon spent against the budget"))

    activity = [a for a in data.activity if a.selected or a.accepted or a.rejected or a.dropped]
    if activity:
        blocks.append(Heading("Participation per round", 3))
        blocks.append(
            Table(
                ("round", "selected", "accepted", "rejected", "dropped", "reasons"),
                tuple(_activity_row(a, data.activity_source) for a in activity),
            )
        )
        plot_participation(activity, out_dir / f"{prefix}participation.png")
        blocks.append(
            image("participation.png", f"{label}: accepted, rejected and dropped clients per round")
        )
    moved = [a for a in data.activity if a.bytes_down is not None or a.bytes_up is not None]
    if moved:
        blocks += [
            Heading("Bytes per round", 3),
            Table(
                ("round", "down", "up"),
                tuple((str(a.round), _fmt(a.bytes_down), _fmt(a.bytes_up)) for a in moved),
            ),
        ]
        plot_bytes(moved, out_dir / f"{prefix}bytes.png")
        blocks.append(image("bytes.png", f"{label}: bytes per round"))
    return blocks, paths


def _activity_row(a: RoundActivity, source: str) -> tuple[str, ...]:
    selected = str(len(a.selected)) if a.selected or source != "metrics" else "—"
    reasons = "; ".join(
        part
        for part in (
            f"rejected: {_reasons(a.rejected)}" if a.rejected else "",
            f"dropped: {_reasons(a.dropped)}" if a.dropped else "",
        )
        if part
    )
    return (str(a.round), selected, str(len(a.accepted)), str(len(a.rejected)), str(len(a.dropped)), reasons)


def write_report(run_dirs: Sequence[Path], out_dir: Path) -> Report:
    """Read each run directory and write the plots, ``summary.md`` and ``report.html`` (see the module docstring).

    Args:
        run_dirs: simulation run directories or deployment state directories, finished or
            running, in legend/table order.
        out_dir: where the files go; created with its parents if missing. Existing report
            files there are overwritten.

    Returns:
        The written paths (the plots, then ``summary.md`` and ``report.html``) and one
        :class:`RunReport` per run.

    Raises:
        RunStateError: no run was given, a run directory or its ``metrics.jsonl`` is
            missing or unreadable, it has no configuration (``config.toml`` or the state
            database's), or a metrics line is malformed (the message names the file and
            line). Nothing is written in that case.
    """
    if not run_dirs:
        raise RunStateError(
            "no run directories given: pass at least one directory written by `fedloom simulate` "
            "or a `fedloom server --state-dir`"
        )
    datas = [load_run(d, check_row=_row_problems) for d in run_dirs]
    for data in datas:
        if not data.rows:
            raise RunStateError(
                f"{data.run_dir / 'metrics.jsonl'} holds no rounds; let the run finish at least one round first"
            )
    labels = run_labels([d.resolve().name for d in run_dirs], [dict(d.config) for d in datas])
    runs: list[_LoadedRun] = []
    for data, label in zip(datas, labels, strict=True):
        config = data.config
        target = _as_float(_get(config, "eval.target_accuracy")) or 0.0
        rows = _canonical(data.rows)
        report = RunReport(
            run_dir=data.run_dir,
            label=label,
            algorithm=_show(_get(config, "algorithm.name") or "?"),
            model=_show(_get(config, "model.name") or "?"),
            partition=_show(_get(config, "data.partition") or "?"),
            target=target,
            summary=summarize_run(rows, target),
        )
        runs.append(_LoadedRun(report, data, rows))

    out_dir.mkdir(parents=True, exist_ok=True)
    accuracy, loss = out_dir / "accuracy.png", out_dir / "loss.png"
    plot_runs = [PlotRun(label=r.report.label, target=r.report.target, rows=r.rows) for r in runs]
    plot_accuracy(plot_runs, accuracy)
    plot_loss(plot_runs, loss)
    reports = tuple(r.report for r in runs)
    blocks: list[Block] = [
        Heading("fedloom report", 1),
        _overview(reports),
        Para("Runs:"),
        Bullets(tuple(f"{r.label}: {r.run_dir}" for r in reports)),
        Image(accuracy, "test accuracy"),
        Image(loss, "loss"),
    ]
    paths = [accuracy, loss]
    for i, run in enumerate(runs):
        more, written = _run_blocks(run, out_dir, "" if len(runs) == 1 else f"run{i + 1}-")
        blocks += more
        paths += written
    summary, page = out_dir / "summary.md", out_dir / "report.html"
    summary.write_text(to_markdown(blocks), encoding="utf-8")
    page.write_text(to_html(blocks, "fedloom report"), encoding="utf-8")
    return Report(paths=(*paths, summary, page), runs=reports)
