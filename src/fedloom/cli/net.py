"""``fedloom server``, ``fedloom client``, ``fedloom certs`` and ``fedloom status`` (the deployment CLI)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer

from fedloom.cli.main import (
    ConfigOpt,
    DashboardHostOpt,
    DashboardOpt,
    DashboardPortOpt,
    DashboardTokenOpt,
    SetOpt,
    _console,
    _fail,
    _open_dashboard,
    app,
)
from fedloom.config.loader import load_config
from fedloom.core.errors import FedloomError

if TYPE_CHECKING:
    from fedloom.config.schema import ExperimentConfig
    from fedloom.data.datasets import ArrayDataset
    from fedloom.tasks.task import Task

__all__: list[str] = []

TlsDirOpt = Annotated[
    Path | None,
    typer.Option("--tls-dir", help="Directory written by `fedloom certs` (server) or a client's bundle."),
]


LogFormatOpt = Annotated[
    Literal["auto", "json", "text"],
    typer.Option(
        "--log-format",
        envvar="FEDLOOM_LOG_FORMAT",
        help="Events on stderr as 'json' lines, 'text' lines, or 'auto': text on a terminal, JSON "
        "otherwise. The state directory's log file is JSON either way.",
    ),
]


def _need_net() -> None:
    import importlib.util

    if importlib.util.find_spec("grpc") is None:
        raise _fail(FedloomError("the deployment runtime needs the 'net' extra: pip install 'fedloom[net]'"))


@app.command()
def server(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    listen: Annotated[str, typer.Option("--listen", help="HOST:PORT to listen on (port 0 = any).")] = (
        "127.0.0.1:8470"
    ),
    state_dir: Annotated[
        Path, typer.Option("--state-dir", help="Run state (SQLite); an existing run is resumed.")
    ] = Path("fedloom-server"),
    tls_dir: TlsDirOpt = None,
    tokens: Annotated[
        Path | None, typer.Option("--tokens", help="tokens.json of per-client tokens (default: TLS dir's).")
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option("--insecure", help="Allow a non-loopback address without TLS (never in production)."),
    ] = False,
    eval_data: Annotated[
        str | None,
        typer.Option(
            "--eval-data",
            help="Central test set: 'task' (the task's own), 'config' or FILE.py:ARG (see `client --data`).",
        ),
    ] = None,
    log_format: LogFormatOpt = "auto",
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="Directory for --eval-data.")] = None,
    threads: Annotated[
        int,
        typer.Option(
            "--threads", min=1, help="torch intra-op threads for validation, aggregation and evaluation."
        ),
    ] = 1,
    dashboard: DashboardOpt = False,
    dashboard_host: DashboardHostOpt = "127.0.0.1",
    dashboard_port: DashboardPortOpt = 0,
    dashboard_token: DashboardTokenOpt = None,
) -> None:
    """Run the federated server for an experiment; clients connect with `fedloom client`."""
    _need_net()
    import gc

    import torch

    from fedloom.net.auth import Credentials
    from fedloom.net.datasources import load_eval_data
    from fedloom.net.logs import JsonLog
    from fedloom.net.memory import keep_freed_buffers
    from fedloom.net.server import ServerOptions, run_server
    from fedloom.net.transport import check_plaintext

    state_dir.mkdir(parents=True, exist_ok=True)
    log = JsonLog("server", file=state_dir / "server.log.jsonl", fmt=log_format)
    try:
        cfg = load_config(config, set_ or [])
        tls = Credentials()
        if tls_dir is not None:
            tls = Credentials(ca=tls_dir / "ca.pem", cert=tls_dir / "server.pem", key=tls_dir / "server.key")
            tokens = tokens if tokens is not None else tls_dir / "tokens.json"
        else:
            check_plaintext(listen, insecure=insecure, role="--listen")  # before loading any data
        if tokens is None:
            log("auth_disabled", level="warning", reason="no --tokens/--tls-dir: any client name is accepted")
        search = (config.resolve().parent, Path.cwd()) if config is not None else (Path.cwd(),)
        test = load_eval_data(eval_data, cfg, data_dir=data_dir, search=search) if eval_data else None
        options = ServerOptions(
            listen=listen, tls=tls, tokens=tokens, eval_data=test, insecure=insecure, search=search
        )
        # One intra-op thread by default: the server's event loop, its round loop and its worker
        # threads already share the cores, and OpenMP teams in each of them oversubscribe and spin.
        torch.set_num_threads(threads)
        # The many long-lived objects of the imports (torch, grpc) leave the collector's view, so
        # the full collections that the RPC handlers' allocations trigger stay cheap.
        gc.freeze()
        keep_freed_buffers()
        # The page follows the state directory's event log, whichever process writes it.
        close_dashboard = _open_dashboard(
            _console(), dashboard, state_dir, dashboard_host, dashboard_port, dashboard_token
        )
        try:
            state = run_server(cfg, state_dir, options, log)
        finally:
            close_dashboard()
        _console().print(f"done after round {state.round}; state and model in {state_dir}")
    except FedloomError as exc:
        raise _fail(exc) from None


@app.command()
def client(
    server: Annotated[str, typer.Option("--server", help="HOST:PORT of the fedloom server.")],
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="'task' (the task's own data for this client: by --client-id among per-client data, or "
            "--partition-client of a central set), 'config' (with --partition-client) or a loader "
            "'FILE.py:ARG' / 'module:ARG'.",
        ),
    ] = "task",
    eval_data: Annotated[
        str,
        typer.Option(
            "--eval-data",
            help="This site's test split for evaluation rounds: 'auto' (with --data task the task's own "
            "split for this client; with a loader FILE.py:ARG its load_eval(ARG) if defined), 'task', "
            "'none', or a loader 'FILE.py:ARG' / 'module:ARG' (its load_eval).",
        ),
    ] = "auto",
    client_id: Annotated[
        str | None, typer.Option("--client-id", help="This client's name in deploy.clients.")
    ] = None,
    token: Annotated[str | None, typer.Option("--token", help="This client's token.")] = None,
    token_file: Annotated[Path | None, typer.Option("--token-file", help="File holding the token.")] = None,
    tls_dir: TlsDirOpt = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="Where the loader finds data.")] = None,
    partition_client: Annotated[
        int | None, typer.Option("--partition-client", help="With --data config: this client's partition.")
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option("--state-dir", help="Client state directory (default .fedloom-client/NAME)."),
    ] = None,
    give_up_after: Annotated[
        float, typer.Option("--give-up-after", help="Exit after this many seconds without the server.")
    ] = 300.0,
    threads: Annotated[int, typer.Option("--threads", help="torch CPU threads for local training.")] = 1,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="This site's own experiment file: the code (model import path) that the server's "
            "config may name; without it only built-in models are accepted.",
        ),
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option("--insecure", help="Allow a non-loopback server without TLS (never in production)."),
    ] = False,
    device: Annotated[
        str, typer.Option("--device", help="Train on this device (cpu, cuda, cuda:1); default: the task's.")
    ] = "",
    log_format: LogFormatOpt = "auto",
) -> None:
    """Join a fedloom server and train on this machine's data until the run ends."""
    _need_net()
    import torch

    from fedloom.net.auth import Credentials
    from fedloom.net.client import ClientOptions, NetClient
    from fedloom.net.datasources import client_test_data, load_client_data, task_client_data
    from fedloom.net.logs import JsonLog
    from fedloom.net.memory import keep_freed_buffers

    torch.set_num_threads(max(1, threads))
    keep_freed_buffers()  # model-sized buffers every round: see fedloom.net.memory
    name = client_id
    if name is None:
        if data in ("config", "task"):
            if partition_client is None:
                raise _fail(FedloomError(f"--data {data} needs --client-id NAME or --partition-client K"))
            name = str(partition_client)
        else:
            name = data.rpartition(":")[2]
    log = JsonLog(f"client:{name}", fmt=log_format)
    try:
        secret = token or ""
        if token_file is not None:
            secret = token_file.read_text(encoding="utf-8").strip()
        tls = Credentials()
        if tls_dir is not None:
            tls = Credentials(ca=tls_dir / "ca.pem", cert=tls_dir / "cert.pem", key=tls_dir / "key.pem")
            if not secret and (tls_dir / "token").is_file():
                secret = (tls_dir / "token").read_text(encoding="utf-8").strip()
        local = load_config(config, []) if config is not None else None
        opts = ClientOptions(
            server=server,
            name=name,
            token=secret,
            tls=tls,
            state_dir=state_dir if state_dir is not None else Path(".fedloom-client") / name,
            give_up_after_s=give_up_after,
            insecure=insecure,
            local_config=local,
            search=(config.resolve().parent, Path.cwd()) if config is not None else (Path.cwd(),),
            device=device or (local.device if local is not None else ""),
        )

        def load(cfg: ExperimentConfig, task: Task) -> ArrayDataset:
            if data == "task":
                return task_client_data(task, cfg, name=name, partition_client=partition_client)
            return load_client_data(data, cfg, data_dir=data_dir, partition_client=partition_client)

        def load_test(cfg: ExperimentConfig, task: Task) -> ArrayDataset | None:
            return client_test_data(
                eval_data,
                data,
                task,
                cfg,
                name=name,
                data_dir=data_dir,
                partition_client=partition_client,
            )

        code = NetClient(opts, log, load_data=load, load_test=load_test).serve()
    except FedloomError as exc:
        raise _fail(exc) from None
    raise typer.Exit(code=code)


certs_app = typer.Typer(
    help="Create a CA, a server certificate and per-client credentials (or revoke a client); "
    "`certs request` / `certs sign` for keys made at each site."
)
app.add_typer(certs_app, name="certs")


@certs_app.callback(invoke_without_command=True)
def certs(
    ctx: typer.Context,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Directory to write the credentials to.")
    ] = None,
    clients: Annotated[
        str | None,
        typer.Option(
            "--clients", help="Comma-separated client names (none: sites enrol with `certs request`)."
        ),
    ] = None,
    hosts: Annotated[
        str, typer.Option("--hosts", help="Comma-separated server host names/IPs for its certificate.")
    ] = "localhost,127.0.0.1",
    revoke: Annotated[
        str | None, typer.Option("--revoke", help="Revoke this client in OUT/tokens.json.")
    ] = None,
    add: Annotated[
        bool,
        typer.Option(
            "--add", help="OUT holds credentials: issue only new clients', with its CA, keeping the rest."
        ),
    ] = False,
    force: Annotated[
        bool,
        typer.Option("--force", help="Replace existing credentials in OUT (a new CA: every site re-enrols)."),
    ] = False,
) -> None:
    """Create a CA, a server certificate and per-client credentials (or revoke a client)."""
    if ctx.invoked_subcommand is not None:
        return
    from fedloom.net.auth import generate_credentials
    from fedloom.net.auth import revoke as revoke_client

    try:
        if out is None:
            raise FedloomError("--out DIR is required")
        if revoke is not None:
            revoke_client(out, revoke)
            _console().print(f"revoked {revoke!r} in {out / 'tokens.json'}")
            return
        if add and force:
            raise FedloomError("--add keeps the existing CA and --force replaces it: give one of them")
        names = [c.strip() for c in clients.split(",")] if clients else []
        if add and not names:
            raise FedloomError("--add needs --clients with the new names")
        written = generate_credentials(
            out, names, hosts=[h.strip() for h in hosts.split(",") if h.strip()], force=force, add=add
        )
    except FedloomError as exc:
        raise _fail(exc) from None
    if add:
        kept = [n for n in names if n not in written]
        _console().print(
            f"added {', '.join(written) or 'no client'} to {out} with its existing CA"
            + (f"; kept {', '.join(kept)} unchanged" if kept else "")
        )
        return
    _console().print(
        f"wrote CA, server certificate, tokens.json and {len(names)} client bundles to {out}; "
        f"give each client {out}/clients/NAME/ (keep ca.key and tokens.json on the server); sites that "
        f"make their own keys run `fedloom certs request`, then you run `fedloom certs sign --ca {out}`"
    )


@certs_app.command("request")
def certs_request(
    name: Annotated[str, typer.Option("--name", help="This site's client name (in deploy.clients).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="This site's credentials directory.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key.pem in OUT.")] = False,
) -> None:
    """At a site: make this site's private key (it stays in OUT) and a signing request for the operator."""
    from fedloom.net.pki import request_certificate

    try:
        csr = request_certificate(out, name, force=force)
    except FedloomError as exc:
        raise _fail(exc) from None
    _console().print(
        f"wrote the private key {out / 'key.pem'} (keep it here) and the request {csr}: send the request to "
        f"the operator, who runs `fedloom certs sign --ca DIR --csr {csr.name} --name {name}`; put the "
        f"cert.pem, ca.pem and token they send back into {out} and start the client with --tls-dir {out}"
    )


@certs_app.command("sign")
def certs_sign(
    ca: Annotated[
        Path, typer.Option("--ca", help="The directory written by `fedloom certs` (CA and tokens).")
    ],
    csr: Annotated[Path, typer.Option("--csr", help="The site's certificate signing request.")],
    name: Annotated[str, typer.Option("--name", help="The client name the request must be for.")],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Where to write cert.pem, ca.pem and token (default CA/clients/NAME)."
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace the certificate and token of an already registered name.")
    ] = False,
) -> None:
    """At the operator: check a site's signing request and issue its certificate and token."""
    from fedloom.net.pki import sign_request

    try:
        target = sign_request(ca, csr, name=name, out=out, force=force)
    except FedloomError as exc:
        raise _fail(exc) from None
    _console().print(
        f"signed {name!r}: send {target}/cert.pem, ca.pem and token to the site ({name} is in {ca / 'tokens.json'})"
    )


@app.command()
def status(
    server: Annotated[str, typer.Option("--server", help="HOST:PORT of the fedloom server.")],
    tls_dir: TlsDirOpt = None,
    token: Annotated[str | None, typer.Option("--token", help="The operator token.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON.")] = False,
    insecure: Annotated[
        bool,
        typer.Option("--insecure", help="Allow a non-loopback server without TLS (never in production)."),
    ] = False,
) -> None:
    """Show a running server's round, clients, last metrics and rejections."""
    _need_net()
    from fedloom.net.auth import Credentials
    from fedloom.net.client import fetch_status
    from fedloom.net.transport import check_plaintext

    tls = Credentials()
    secret = token or ""
    if tls_dir is not None:
        tls = Credentials(ca=tls_dir / "ca.pem", cert=tls_dir / "operator.pem", key=tls_dir / "operator.key")
        if not secret and (tls_dir / "operator.token").is_file():
            secret = (tls_dir / "operator.token").read_text(encoding="utf-8").strip()
    try:
        if tls.ca is None and check_plaintext(server, insecure=insecure, role="--server"):
            _console(stderr=True).print(
                f"warning: --insecure: the operator token goes to {server} in clear text"
            )
        info = fetch_status(server, tls, secret, insecure=insecure)
    except FedloomError as exc:
        raise _fail(exc) from None
    if as_json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
        return
    con = _console()
    cur = info.get("current") or {}
    con.print(
        f"run {info['run_id']}: completed round {info['completed_round']}"
        + ("  (done)" if info["done"] else "")
    )
    if cur:
        con.print(
            f"round {cur['round']} (attempt {cur['attempt']}, {'open' if cur['open'] else 'closing'}, "
            f"deadline in {cur['deadline_in_s']} s): accepted {len(cur['accepted'])}/{len(cur['selected'])} "
            f"{', '.join(cur['accepted'])}"
        )
    online = [c["name"] for c in info["clients"] if c["online"]]
    con.print(f"clients online {len(online)}/{len(info['clients'])}: {', '.join(online)}")
    con.print("last metrics: " + json.dumps(info["last_metrics"]))
    con.print("rejections: " + (json.dumps(info["rejections"]) if info["rejections"] else "none"))
    con.print("audit: " + json.dumps(info["audit"]))
    refused = info.get("refused") or {}
    if refused.get("total"):
        con.print(f"refused calls: {refused['total']} ({refused.get('unrecorded', 0)} not yet recorded)")


@app.command()
def rollback(
    state_dir: Annotated[Path, typer.Argument(help="The server's --state-dir (stop the server first).")],
    round_: Annotated[
        int, typer.Option("--round", min=0, help="The kept checkpoint's round to resume from.")
    ],
) -> None:
    """Make a kept checkpoint of a deployed run the latest; the next `fedloom server` resumes from it."""
    from fedloom.net.rollback import roll_back

    try:
        dropped = roll_back(state_dir, round_)
    except FedloomError as exc:
        raise _fail(exc) from None
    _console().print(
        f"{state_dir}: resumes from round {round_}"
        + (f"; checkpoints of rounds {dropped} removed" if dropped else "")
    )
