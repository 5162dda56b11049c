"""Trust boundaries with real processes: server-named code, plaintext, TLS failures, site-held keys."""

from __future__ import annotations

import io
import json
import re
import shutil
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from tests.conftest import run_cli
from tests.net.helpers import BASE_TOML, HEART_DIR, LOADER, Proc, free_port, server

from fedloom.config.loader import config_to_toml, parse_config
from fedloom.config.schema import ExperimentConfig
from fedloom.net.auth import Credentials
from fedloom.net.client import EXIT_AUTH, EXIT_GAVE_UP, EXIT_UNTRUSTED_CONFIG, make_channel
from fedloom.net.logs import JsonLog
from fedloom.net.proto import fedloom_pb2 as pb
from fedloom.net.proto import fedloom_pb2_grpc as pbg
from fedloom.net.server import ServerOptions, run_server
from fedloom.net.transport import InsecureTransportError
from fedloom.net.trust import check_server_config

pytestmark = pytest.mark.slow

# One client, one round: the smallest real run.
ONE_CLIENT_TOML = (
    BASE_TOML.replace('clients = ["cleveland", "hungarian", "switzerland", "va"]', 'clients = ["hospital-a"]')
    .replace("min_clients = 4", "min_clients = 1")
    .replace("num_clients = 4", "num_clients = 1")
    .replace("min_quorum = 4", "min_quorum = 1")
    .replace("rounds = 4", "rounds = 1")
    .replace('name = "scaffold"', 'name = "fedavg"')
)

EVIL = """
from pathlib import Path
Path("IMPORTED").write_text("the client imported code named by the server")

def boom(**kwargs):
    Path("CALLED").write_text("the client called code named by the server")
    raise SystemExit(0)
"""

SITE_MODEL = """
from torch import nn

class Net(nn.Module):
    def __init__(self, in_features: int = 13, num_classes: int = 2) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x):
        return self.linear(x.flatten(1))
"""


def _cfg(text: str) -> ExperimentConfig:
    import tomllib

    return parse_config(tomllib.loads(text))


class _FakeJoin(pbg.CoordinatorServicer):
    """A malicious server: answers Join with a configuration naming ``model``; nothing else."""

    def __init__(self, config_toml: str) -> None:
        self.config_toml = config_toml
        self.joins: list[str] = []

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        self.joins.append(request.client_name)
        return pb.JoinReply(
            client_id=0,
            config_toml=self.config_toml,
            run_id="evil",
            max_message_bytes=4 * 1024 * 1024,
            heartbeat_s=5.0,
            population=1,
        )


def _site_client(cwd: Path, port: int, *extra: str, name: str, host: str = "127.0.0.1") -> Proc:
    return Proc(
        [
            "client",
            "--server",
            f"{host}:{port}",
            "--client-id",
            "hospital-a",
            "--data",
            f"{LOADER}:cleveland",
            "--data-dir",
            str(HEART_DIR),
            "--state-dir",
            str(cwd / "cstate" / name),
            "--give-up-after",
            "5",
            *extra,
        ],
        cwd,
        name,
    )


# ---- 1. the server's config selects code, it never names it ---------------------------------


def test_check_server_config_names_key_server_value_and_local_value() -> None:
    evil = _cfg('[model]\nname = "os:system"\n')
    assert check_server_config(_cfg('[model]\nname = "cnn"\n'), None) == []  # a built-in name
    [problem] = check_server_config(evil, None)
    assert "model.name" in problem
    assert "'os:system'" in problem
    assert "no local configuration" in problem
    [problem] = check_server_config(evil, _cfg('[model]\nname = "2nn"\n'))
    assert "model.name" in problem
    assert "'os:system'" in problem
    assert "'2nn'" in problem
    assert check_server_config(evil, _cfg('[model]\nname = "os:system"\n')) == []  # the operator's choice
    assert check_server_config(_cfg('[model]\nname = "evil.py"\n'), None)  # a file is code too


def test_client_refuses_a_server_config_naming_code_and_imports_nothing(
    heart_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "evil_mod.py").write_text(EVIL, encoding="utf-8")  # importable from the client's cwd
    cfg = _cfg(ONE_CLIENT_TOML.replace('name = "2nn"', 'name = "evil_mod:boom"'))
    fake = _FakeJoin(config_to_toml(cfg))
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pbg.add_CoordinatorServicer_to_server(fake, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    local = tmp_path / "local.toml"
    local.write_text(ONE_CLIENT_TOML, encoding="utf-8")  # this site chose the built-in 2nn
    bare = _site_client(tmp_path, port, name="bare")
    mine = _site_client(tmp_path, port, "--config", str(local), name="mine")
    try:
        assert bare.wait(60) == EXIT_UNTRUSTED_CONFIG, bare.err.read_text()[-2000:]
        assert mine.wait(60) == EXIT_UNTRUSTED_CONFIG, mine.err.read_text()[-2000:]
    finally:
        bare.stop()
        mine.stop()
        srv.stop(0)
    assert fake.joins.count("hospital-a") == 2  # both really talked to the server
    assert not (tmp_path / "IMPORTED").exists()
    assert not (tmp_path / "CALLED").exists()
    [refusal] = bare.events("config_refused")
    assert refusal["level"] == "error"
    assert "model.name" in refusal["reason"]
    assert "'evil_mod:boom'" in refusal["reason"]
    assert "no local configuration" in refusal["reason"]
    [refusal] = mine.events("config_refused")
    assert "'evil_mod:boom'" in refusal["reason"]
    assert "'2nn'" in refusal["reason"]


def test_client_runs_the_user_model_its_own_config_names(heart_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "sitemodel.py").write_text(SITE_MODEL, encoding="utf-8")
    exp = tmp_path / "exp.toml"
    exp.write_text(
        ONE_CLIENT_TOML.replace('name = "2nn"', 'name = "sitemodel:Net"').replace(
            "kwargs = { in_features = 13, hidden = 100, num_classes = 2 }", "kwargs = { in_features = 13 }"
        ),
        encoding="utf-8",
    )
    port = free_port()
    srv = server(tmp_path, exp, port)
    site = _site_client(tmp_path, port, "--config", str(exp), "--give-up-after", "60", name="site")
    try:
        assert srv.wait(120) == 0, srv.err.read_text()[-3000:]
        assert site.wait(30) == 0, site.err.read_text()[-3000:]
    finally:
        srv.stop()
        site.stop()
    assert site.events("update_accepted")
    assert not site.events("config_refused")


# ---- 2. plaintext only on loopback or with the loud opt-out; TLS failures say why -----------


def test_library_refuses_plaintext_off_loopback(tmp_path: Path) -> None:
    cfg = _cfg(ONE_CLIENT_TOML)
    log = JsonLog("server", stream=io.StringIO())
    # 192.0.2.1 is TEST-NET-1: refused before any socket is opened.
    with pytest.raises(InsecureTransportError, match=r"not a loopback address.*insecure"):
        run_server(cfg, tmp_path / "srv", ServerOptions(listen="192.0.2.1:0"), log)
    assert not (tmp_path / "srv").exists()  # refused before any state was written
    with pytest.raises(InsecureTransportError, match=re.escape("client --server 192.0.2.1:8470")):
        make_channel("192.0.2.1:8470", Credentials(), 4096)
    make_channel("192.0.2.1:8470", Credentials(), 4096, insecure=True).close()  # opted out: allowed
    make_channel("127.0.0.1:8470", Credentials(), 4096).close()  # loopback: allowed


def test_plaintext_off_loopback_needs_insecure_and_tls_to_plaintext_says_so(
    heart_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "127.1" is 127.0.0.1 to the C library's resolver but not a loopback address to
    # fedloom's check: it plays a remote host without leaving the machine.
    monkeypatch.setenv("GRPC_DNS_RESOLVER", "native")
    run_cli("certs", "--out", str(tmp_path / "certs"), "--clients", "hospital-a", cwd=tmp_path)
    exp = tmp_path / "exp.toml"
    exp.write_text(ONE_CLIENT_TOML, encoding="utf-8")
    port = free_port()
    refused_srv = Proc(
        ["server", "--config", str(exp), "--listen", f"127.1:{port}", "--state-dir", str(tmp_path / "x")],
        tmp_path,
        "refused-server",
    )
    assert refused_srv.wait(60) == 2
    assert "--insecure" in refused_srv.err.read_text()
    srv = Proc(
        [
            "server",
            "--config",
            str(exp),
            "--listen",
            f"127.1:{port}",
            "--state-dir",
            str(tmp_path / "srv"),
            "--eval-data",
            f"{LOADER}:all",
            "--data-dir",
            str(HEART_DIR),
            "--insecure",
        ],
        tmp_path,
        "plain-server",
    )
    no_optout = _site_client(tmp_path, port, name="no-optout", host="127.1")
    tls_to_plain = _site_client(
        tmp_path,
        port,
        "--tls-dir",
        str(tmp_path / "certs" / "clients" / "hospital-a"),
        name="tls",
        host="127.1",
    )
    procs = [srv, no_optout, tls_to_plain]
    try:
        srv.wait_event("listening", timeout=90)
        assert no_optout.wait(60) == 2
        assert tls_to_plain.wait(60) == EXIT_AUTH
        good = _site_client(tmp_path, port, "--insecure", "--give-up-after", "60", name="good", host="127.1")
        procs.append(good)
        assert srv.wait(120) == 0, srv.err.read_text()[-3000:]
        assert good.wait(30) == 0, good.err.read_text()[-3000:]
    finally:
        for p in procs:
            p.stop()
    assert srv.events("plaintext")[0]["level"] == "warning"
    assert good.events("plaintext")[0]["level"] == "warning"
    assert "not a loopback address" in no_optout.err.read_text()
    [failed] = tls_to_plain.events("tls_failed")
    assert "does not speak TLS" in failed["reason"]


def test_tls_failures_name_the_cause(heart_dir: Path, tmp_path: Path) -> None:
    run_cli("certs", "--out", str(tmp_path / "certs"), "--clients", "hospital-a", cwd=tmp_path)
    run_cli("certs", "--out", str(tmp_path / "other"), "--clients", "hospital-a", cwd=tmp_path)
    exp = tmp_path / "exp.toml"
    exp.write_text(ONE_CLIENT_TOML, encoding="utf-8")
    port = free_port()
    procs = [server(tmp_path, exp, port, "--tls-dir", str(tmp_path / "certs"))]
    try:
        procs[0].wait_event("listening", timeout=90)  # so that every failure below is the handshake's
        wrong_ca = _site_client(
            tmp_path, port, "--tls-dir", str(tmp_path / "other" / "clients" / "hospital-a"), name="ca"
        )
        plain = _site_client(tmp_path, port, "--give-up-after", "3", name="plain")
        procs += [wrong_ca, plain]
        assert wrong_ca.wait(60) == EXIT_AUTH, wrong_ca.err.read_text()[-2000:]
        assert plain.wait(60) == EXIT_GAVE_UP, plain.err.read_text()[-2000:]
    finally:
        for p in procs:
            p.stop()
    [failed] = wrong_ca.events("tls_failed")
    assert "certificate verify failed" in failed["reason"]
    assert "ca.pem" in failed["reason"]
    assert plain.events("server_unreachable")
    assert all("expects TLS" in e["reason"] for e in plain.events("server_unreachable"))
    assert "expects TLS" in plain.events("gave_up")[0]["reason"]


# ---- 3. keys made at the site; certs never overwrite silently -------------------------------


def test_site_made_key_with_operator_signed_certificate_joins_over_mutual_tls(
    heart_dir: Path, tmp_path: Path
) -> None:
    ops, site, back = tmp_path / "ops", tmp_path / "site", tmp_path / "back"
    run_cli("certs", "--out", str(ops), cwd=tmp_path)  # CA, server and operator only: no client keys
    run_cli("certs", "request", "--name", "hospital-a", "--out", str(site), cwd=tmp_path)
    assert (site / "key.pem").stat().st_mode & 0o077 == 0
    csr = tmp_path / "in-transit.csr"
    shutil.copy(site / "hospital-a.csr", csr)  # only the request travels to the operator
    run_cli(
        "certs",
        "sign",
        "--ca",
        str(ops),
        "--csr",
        str(csr),
        "--name",
        "hospital-a",
        "--out",
        str(back),
        cwd=tmp_path,
    )
    assert sorted(p.name for p in back.iterdir()) == ["ca.pem", "cert.pem", "token"]
    for f in back.iterdir():
        shutil.copy(f, site / f.name)  # ... and the certificate, CA and token travel back
    site_key = (site / "key.pem").read_bytes()
    assert not any(p.is_file() and p.read_bytes() == site_key for p in ops.rglob("*"))
    assert "hospital-a" in json.loads((ops / "tokens.json").read_text())["clients"]
    exp = tmp_path / "exp.toml"
    exp.write_text(ONE_CLIENT_TOML, encoding="utf-8")
    port = free_port()
    srv = server(tmp_path, exp, port, "--tls-dir", str(ops))
    c = _site_client(tmp_path, port, "--tls-dir", str(site), "--give-up-after", "60", name="site")
    try:
        assert srv.wait(120) == 0, srv.err.read_text()[-3000:]
        assert c.wait(30) == 0, c.err.read_text()[-3000:]
    finally:
        srv.stop()
        c.stop()
    assert srv.events("listening")[0]["mutual_tls"] is True
    assert [e["client"] for e in srv.events("join")] == ["hospital-a"]
    assert c.events("update_accepted")


def _rsa_csr(name: str) -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.DER)


def test_sign_refuses_a_bad_signature_and_a_wrong_name(tmp_path: Path) -> None:
    ops = tmp_path / "ops"
    run_cli("certs", "--out", str(ops), cwd=tmp_path)
    tokens = (ops / "tokens.json").read_bytes()
    der = bytearray(_rsa_csr("hospital-a"))
    der[-1] ^= 1  # the last byte of the RSA signature: still a well-formed request
    forged = tmp_path / "forged.csr"
    forged.write_bytes(x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM))
    proc = run_cli(
        "certs",
        "sign",
        "--ca",
        str(ops),
        "--csr",
        str(forged),
        "--name",
        "hospital-a",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2
    assert "signature does not verify" in proc.stderr
    other = tmp_path / "other.csr"
    other.write_bytes(x509.load_der_x509_csr(_rsa_csr("hospital-b")).public_bytes(serialization.Encoding.PEM))
    proc = run_cli(
        "certs",
        "sign",
        "--ca",
        str(ops),
        "--csr",
        str(other),
        "--name",
        "hospital-a",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2
    assert "'hospital-b', not for the expected client 'hospital-a'" in proc.stderr
    assert (ops / "tokens.json").read_bytes() == tokens
    assert not (ops / "clients").exists()


def test_certs_refuses_to_replace_existing_credentials_unless_asked(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    run_cli("certs", "--out", str(out), "--clients", "a,b", cwd=tmp_path)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = run_cli("certs", "--out", str(out), "--clients", "a,b", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "already holds credentials" in proc.stderr
    assert "--force" in proc.stderr
    assert "--add" in proc.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    run_cli("certs", "--out", str(out), "--clients", "a,b,c", "--add", cwd=tmp_path)
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    changed = sorted(str(p.relative_to(out)) for p in after if before.get(p) != after[p])
    assert changed == [
        "clients/c/ca.pem",
        "clients/c/cert.pem",
        "clients/c/key.pem",
        "clients/c/token",
        "tokens.json",
    ]
    book = json.loads((out / "tokens.json").read_text())["clients"]
    assert book["a"] == json.loads(before[out / "tokens.json"])["clients"]["a"]  # kept
    assert set(book) == {"a", "b", "c", "operator"}
    run_cli("certs", "--out", str(out), "--clients", "a", "--force", cwd=tmp_path)
    assert (out / "ca.pem").read_bytes() != before[out / "ca.pem"]
