"""``fedloom report``: plots and a markdown summary of one or more finished runs.

A run directory written by ``fedloom simulate`` holds ``config.toml`` (the resolved
experiment) and ``metrics.jsonl`` (one JSON object per round). :func:`write_report`
reads both for every run and writes three files into ``out_dir``:

* ``accuracy.png``: test accuracy against round, runs overlaid, with a dashed line at
  each configured ``eval.target_accuracy`` above 0;
* ``loss.png``: train loss (left) and test loss (right) against round, runs overlaid;
* ``summary.md``: one table row per run (see :class:`RunSummary`) and links to the plots.

The numbers come from the pure function :func:`summarize_run`; labels from :func:`run_labels`.
Plots are drawn by :mod:`fedloom.results.plots`.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedloom.core.errors import RunStateError
from fedloom.results.plots import PlotRun, plot_accuracy, plot_loss

__all__ = ["Report", "RunReport", "RunSummary", "run_labels", "summarize_run", "write_report"]

_REQUIRED = ("round", "seconds")
# Present in every row; null in a round that trained nobody (an empty Poisson cohort).
_NULLABLE = ("train_loss",)
_OPTIONAL = ("test_accuracy", "test_loss", "fed_accuracy", "fed_loss", "num_clients")
# Keys that differ between runs without describing the experiment; never used in labels.
_LABEL_IGNORED = frozenset({"out_dir", "data.dir"})
_LABEL_MAX_KEYS = 3
_MAX_PROBLEMS_SHOWN = 5


@dataclass(frozen=True)
class RunSummary:
    """Headline numbers of one run; accuracies are fractions in [0, 1], times in seconds.

    ``final_accuracy`` is the test accuracy of the last evaluated round. The accuracy
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
    evaluated = [
        (rnd, acc)
        for rnd, row in zip(rounds, rows, strict=True)
        if (acc := _number(row, "test_accuracy")) is not None and math.isfinite(acc)
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


def _missing(path: Path) -> RunStateError:
    return RunStateError(
        f"{path} not found: {path.parent} is not a complete run directory; "
        "pass a directory written by `fedloom simulate`"
    )


def _read_config(run_dir: Path) -> dict[str, object]:
    path = run_dir / "config.toml"
    try:
        with path.open("rb") as fh:
            return dict(tomllib.load(fh))
    except FileNotFoundError:
        raise _missing(path) from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise RunStateError(f"cannot read {path}: {exc}; restore or regenerate the file") from exc


def _read_metrics(run_dir: Path) -> list[Mapping[str, object]]:
    path = run_dir / "metrics.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise _missing(path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunStateError(f"cannot read {path}: {exc}") from exc
    rows: list[Mapping[str, object]] = []
    problems: list[str] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row: object = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{path}:{lineno}: not valid JSON ({exc.msg})")
            continue
        found = _row_problems(row)
        problems += [f"{path}:{lineno}: {p}" for p in found]
        if not found and isinstance(row, dict):
            rows.append(row)
    if problems:
        shown = problems[:_MAX_PROBLEMS_SHOWN]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more")
        raise RunStateError(
            "malformed metrics file (fix or delete the bad lines, e.g. a line cut short by a crash):\n"
            + "\n".join(f"  - {p}" for p in shown)
        )
    if not rows:
        raise RunStateError(f"{path} holds no rounds; let the run finish at least one round first")
    return _canonical(rows)


def _get(config: Mapping[str, object], dotted: str) -> object:
    node: object = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|")


def _summary_markdown(runs: Sequence[RunReport]) -> str:
    header = (
        "| run | algorithm | model | partition | rounds | final acc | best acc (round) "
        "| rounds to target | total s | mean s/round |"
    )
    lines = ["# fedloom report", "", header, "|" + "---|" * 10]
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
        cells = [
            run.label,
            run.algorithm,
            run.model,
            run.partition,
            s.rounds_run,
            acc,
            best,
            to_target,
            f"{s.total_seconds:.2f}",
            f"{s.mean_seconds:.3f}",
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines += ["", "Runs:", ""]
    lines += [f"- {_cell(r.label)}: `{r.run_dir}`" for r in runs]
    lines += ["", "![test accuracy](accuracy.png)", "", "![loss](loss.png)", ""]
    return "\n".join(lines)


@dataclass(frozen=True)
class _LoadedRun:
    report: RunReport
    rows: list[Mapping[str, object]]


def write_report(run_dirs: Sequence[Path], out_dir: Path) -> Report:
    """Read each run directory and write ``accuracy.png``, ``loss.png`` and ``summary.md``.

    Args:
        run_dirs: directories written by ``fedloom simulate``, in legend/table order.
        out_dir: where the files go; created with its parents if missing. Existing report
            files there are overwritten.

    Returns:
        The written paths and one :class:`RunReport` per run.

    Raises:
        RunStateError: no run was given, a run directory, ``config.toml`` or
            ``metrics.jsonl`` is missing or unreadable, or a metrics line is malformed
            (the message names the file and line). Nothing is written in that case.
    """
    if not run_dirs:
        raise RunStateError(
            "no run directories given: pass at least one directory written by `fedloom simulate`"
        )
    for run_dir in run_dirs:
        if not run_dir.is_dir():
            raise RunStateError(
                f"run directory {run_dir} does not exist or is not a directory; "
                "pass a directory written by `fedloom simulate`"
            )
    configs = [_read_config(d) for d in run_dirs]
    rows = [_read_metrics(d) for d in run_dirs]
    labels = run_labels([d.resolve().name for d in run_dirs], configs)
    runs: list[_LoadedRun] = []
    for run_dir, config, run_rows, label in zip(run_dirs, configs, rows, labels, strict=True):
        target = _as_float(_get(config, "eval.target_accuracy")) or 0.0
        report = RunReport(
            run_dir=run_dir,
            label=label,
            algorithm=_show(_get(config, "algorithm.name") or "?"),
            model=_show(_get(config, "model.name") or "?"),
            partition=_show(_get(config, "data.partition") or "?"),
            target=target,
            summary=summarize_run(run_rows, target),
        )
        runs.append(_LoadedRun(report, run_rows))

    out_dir.mkdir(parents=True, exist_ok=True)
    accuracy, loss, summary = out_dir / "accuracy.png", out_dir / "loss.png", out_dir / "summary.md"
    plot_runs = [PlotRun(label=r.report.label, target=r.report.target, rows=r.rows) for r in runs]
    plot_accuracy(plot_runs, accuracy)
    plot_loss(plot_runs, loss)
    reports = tuple(r.report for r in runs)
    summary.write_text(_summary_markdown(reports), encoding="utf-8")
    return Report(paths=(accuracy, loss, summary), runs=reports)
