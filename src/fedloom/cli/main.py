"""The ``fedloom`` command line: simulate, report, partition, config."""

from __future__ import annotations

import datetime
import logging
import os
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from fedloom.config.loader import config_reference_markdown, default_config_toml, load_config, parse_config
from fedloom.config.schema import ExperimentConfig
from fedloom.core.errors import DataError, FedloomError, RunStateError

app = typer.Typer(no_args_is_help=True, help="fedloom: federated learning, simulated and deployed.")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="Experiment file (TOML).")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="Override one key: --set client.lr=0.1")
]


DashboardOpt = Annotated[
    bool,
    typer.Option(
        "--dashboard",
        help="Serve a read-only live web page of the run (needs the 'dashboard' extra); prints its URL.",
    ),
]
DashboardHostOpt = Annotated[
    str,
    typer.Option(
        "--dashboard-host",
        help="Address the dashboard listens on; any but loopback demands a token on every request.",
    ),
]
DashboardPortOpt = Annotated[
    int, typer.Option("--dashboard-port", min=0, max=65535, help="Dashboard port (0: any free port).")
]
DashboardTokenOpt = Annotated[
    str | None,
    typer.Option(
        "--dashboard-token",
        envvar="FEDLOOM_DASHBOARD_TOKEN",
        help="Token the dashboard demands (?token= or Authorization: Bearer); default: none on "
        "loopback, a random one (printed in the URL) elsewhere.",
    ),
]


def _open_dashboard(
    console: Console, enabled: bool, run_dir: Path, host: str, port: int, token: str | None
) -> Callable[[], None]:
    """Start the dashboard of ``run_dir`` when ``enabled`` and print its URL; returns its closer."""
    if not enabled:
        return lambda: None
    from fedloom.dashboard import start_dashboard

    board = start_dashboard(run_dir, host=host, port=port, token=token, title=str(run_dir))
    console.print(f"dashboard: {board.url}")
    return board.close


def _print_trackers(console: Console, cfg: ExperimentConfig, run_dir: Path) -> None:
    """Where the run's trackers wrote, as the command that opens each."""
    t = cfg.tracking
    if t.tensorboard:
        console.print(f"tensorboard: tensorboard --logdir {t.tensorboard_dir or run_dir / 'tensorboard'}")
    if t.mlflow:
        from fedloom.trackers.mlflow import mlflow_uri

        uri = mlflow_uri(cfg, run_dir)
        env = "MLFLOW_ALLOW_FILE_STORE=true " if uri.startswith("file:") else ""
        console.print(f"mlflow: {env}mlflow ui --backend-store-uri {uri}")


def _console(*, stderr: bool = False) -> Console:
    """The CLI's console. Markup and emoji codes are off: what it prints (paths, client names, error
    messages naming ``[section]`` or ``'fedloom[net]'``) is shown verbatim, never read as rich
    style tags or ``:name:`` emoji."""
    return Console(stderr=stderr, markup=False, emoji=False, highlight=False, soft_wrap=True)


def _show_logs(console: Console) -> None:
    """Route fedloom's INFO log lines (e.g. which executor was chosen and why) to the console."""
    logger = logging.getLogger("fedloom")
    if not any(getattr(h, "fedloom_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(console.file)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        handler.fedloom_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _fail(exc: FedloomError) -> typer.Exit:
    _console(stderr=True).print(Text.assemble(("error:", "bold red"), f" {exc}"))
    return typer.Exit(code=2)


def _print_version(value: bool) -> None:
    if value:
        from fedloom import __version__

        sys.stdout.write(f"fedloom {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print fedloom's version and exit."
        ),
    ] = False,
) -> None:
    """fedloom: federated learning, simulated and deployed."""


def _search_dirs(config: Path | None) -> list[Path]:
    """Where a task's module is looked for besides the Python path: the experiment file's folder."""
    return [config.resolve().parent] if config is not None else []


def _new_run_dir(cfg: ExperimentConfig) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.out_dir) / f"{stamp}-{cfg.algorithm.name}-{cfg.model.name.replace(':', '.')}"
    run_dir, i = base, 1
    while run_dir.exists():
        run_dir, i = base.with_name(f"{base.name}-{i}"), i + 1
    return run_dir


@app.command()
def simulate(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory to create.")] = None,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Continue the run in this directory.")
    ] = None,
    report: Annotated[bool, typer.Option(help="Write plots and summary.md when the run ends.")] = True,
    device: Annotated[
        str | None, typer.Option("--device", help="Train and evaluate on this device (cpu, cuda, cuda:1).")
    ] = None,
    dashboard: DashboardOpt = False,
    dashboard_host: DashboardHostOpt = "127.0.0.1",
    dashboard_port: DashboardPortOpt = 0,
    dashboard_token: DashboardTokenOpt = None,
) -> None:
    """Run a federated simulation (the embedded MNIST default when no config is given)."""
    from fedloom.cli.progress import ConsoleListener
    from fedloom.sim.runner import CONFIG, run_simulation

    console = _console()
    try:
        if resume is not None:
            if config is not None or set_:
                raise RunStateError("--resume uses the run's own config.toml; drop --config/--set")
            cfg_path = resume / CONFIG
            if not cfg_path.exists():
                raise RunStateError(f"{resume} is not a run directory: {cfg_path} is missing")
            cfg = parse_config(tomllib.loads(cfg_path.read_text(encoding="utf-8")))
            run_dir = resume
        else:
            overrides = [*(set_ or []), *([f"device={device!r}"] if device else [])]
            cfg = load_config(config, overrides)
            run_dir = out if out is not None else _new_run_dir(cfg)
        _show_logs(console)
        close_dashboard = _open_dashboard(
            console, dashboard, run_dir, dashboard_host, dashboard_port, dashboard_token
        )
        listener = ConsoleListener(console)
        search = [*_search_dirs(config), Path.cwd()]
        try:
            result = run_simulation(cfg, run_dir, resume=resume is not None, listener=listener, search=search)
        finally:
            listener.close()
            close_dashboard()
        m = result.final_metrics
        acc = f", test accuracy {m['test_accuracy']:.4f}" if "test_accuracy" in m else ""
        console.print(f"done: {result.stop_reason} after round {result.final_round}{acc}")
        console.print(
            f"results: {run_dir}  (config.toml, metrics.jsonl, model.safetensors, state.sqlite, checkpoints/)"
        )
        _print_trackers(console, cfg, run_dir)
        if report:
            from fedloom.results.report import write_report

            rep = write_report([run_dir], run_dir)
            console.print("plots: " + ", ".join(str(p) for p in rep.paths))
    except FedloomError as exc:
        raise _fail(exc) from None


@app.command("report")
def report_cmd(
    run_dirs: Annotated[
        list[Path],
        typer.Argument(help="Run directories: `fedloom simulate` runs or `fedloom server --state-dir`s."),
    ],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output directory.")] = None,
) -> None:
    """Write plots (PNG), summary.md and a self-contained report.html of runs, finished or running.

    Per run: accuracy and loss, per-site curves and their distribution across sites, epsilon
    spent against the budget, accepted/rejected/dropped clients per round with the reasons, and
    bytes per round, wherever the run recorded them.
    """
    from fedloom.results.report import write_report

    target = out if out is not None else (run_dirs[0] if len(run_dirs) == 1 else Path("report"))
    try:
        rep = write_report(run_dirs, target)
    except FedloomError as exc:
        raise _fail(exc) from None
    for p in rep.paths:
        _console().print(str(p))


_FULL_STATS_LIMIT = 10_000  # above this, a lazily generated federation is summarised by a sample


@app.command()
def partition(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot", help="Also write a client-by-label heat map and a client-size histogram (PNG) here."
        ),
    ] = None,
    sample: Annotated[
        int,
        typer.Option(
            "--sample",
            min=1,
            help="Clients to summarise when more than 10,000 clients are generated on demand.",
        ),
    ] = 1000,
) -> None:
    """Print per-client statistics of the configured partition (the number of classes comes from the data).

    A federation of more than 10,000 clients whose data is generated on demand
    (e.g. ``data.dataset = "population"``) is summarised over a seeded sample of
    ``--sample`` clients, so that nothing materialises every client.
    """
    import numpy as np

    from fedloom.core.rng import numpy_rng
    from fedloom.data.federated import PartitionedDataset
    from fedloom.data.stats import partition_stats, render_partition_stats
    from fedloom.sim.build import materialise_config

    try:
        cfg = load_config(config, set_ or [])
        m = materialise_config(cfg, search=_search_dirs(config))
        train = m.train
        console = _console()
        split = (
            cfg.data.partition if isinstance(train, PartitionedDataset) else "natural (one client per site)"
        )
        console.print(f"data: {m.source}; partition: {split}; clients: {train.num_clients}")
        ids: np.ndarray | None = None
        if not isinstance(train, PartitionedDataset) and train.num_clients > _FULL_STATS_LIMIT:
            k = min(sample, train.num_clients)
            ids = np.sort(
                numpy_rng(cfg.seed, "partition-sample").choice(train.num_clients, size=k, replace=False)
            )
            console.print(
                f"statistics of a seeded sample of {k} of the {train.num_clients} clients (their data is "
                f"generated on demand; --sample sets how many)"
            )
        listed = ids.tolist() if ids is not None else range(train.num_clients)
        num_classes = max(
            (train.client_data(c).num_classes for c in listed if train.client_size(c) > 0),
            default=0,
        )
        if num_classes == 0:
            raise DataError(f"the task's targets are not class labels; {m.source} has no label statistics")
        stats = partition_stats(train, num_classes, clients=ids)
        render_partition_stats(stats, console)
        if plot is not None:
            from fedloom.data.partition_plot import plot_partition

            paths = plot_partition(stats, plot, title=f"{cfg.data.dataset}, {cfg.data.partition}")
            console.print("plots: " + ", ".join(str(p) for p in paths))
    except FedloomError as exc:
        raise _fail(exc) from None


@app.command("config")
def config_cmd(
    markdown: Annotated[
        bool, typer.Option("--markdown", help="Print the reference as a markdown table.")
    ] = False,
) -> None:
    """Print the default experiment file with every key documented."""
    sys.stdout.write(config_reference_markdown() if markdown else default_config_toml())


def main() -> None:
    """Run the command line as ``fedloom`` (the name shell completion is registered under)."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app(prog_name="fedloom")


from fedloom.cli import net as _net  # noqa: F401,E402
