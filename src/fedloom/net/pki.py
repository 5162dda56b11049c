"""Certificates for a deployment: the operator's CA, and keys that never leave the site that made them.

Two ways to give a client its TLS identity:

1. The operator makes everything (``fedloom certs --out DIR --clients a,b``:
   :func:`generate_credentials`) and hands each site ``DIR/clients/<name>/``. Simple,
   but every client's private key exists on the operator's machine.
2. Each site makes its own key (``fedloom certs request --name a --out SITE``:
   :func:`request_certificate` writes ``SITE/key.pem`` and ``SITE/a.csr``) and sends
   only the certificate signing request; the operator checks and signs it
   (``fedloom certs sign --ca DIR --csr a.csr --name a``: :func:`sign_request`) and
   sends back ``cert.pem``, ``ca.pem`` and ``token``, which the site puts beside its key.

Notes
-----
Threat model for signing: a CSR's self-signature proves only that its sender holds the
private key of the public key inside; it says nothing about who the sender is. The
operator states the name it expects (``--name``), and the CSR's common name must equal
it, so a site cannot obtain a certificate for another site's name (the server compares
the certificate's common name with the client name a caller claims). A CSR whose
signature does not verify was altered or forged and is refused. Existing credentials
are never replaced without ``force``: re-running would otherwise swap the CA and every
token and lock out every site.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedloom.net.auth import OPERATOR, TOKENS, AuthError, _digest, _write_private

__all__ = ["check_client_name", "generate_credentials", "request_certificate", "sign_request"]

CA_FILES = ("ca.pem", "ca.key", TOKENS)


def check_client_name(name: str) -> None:
    """Raise :class:`AuthError` unless ``name`` can be a client's name (and a directory name)."""
    if (
        not name
        or name == OPERATOR
        or "/" in name
        or "\\" in name
        or name.strip() != name
        or name in (".", "..")
    ):
        raise AuthError(
            f"client name {name!r} is not allowed: names are non-empty, without '/' or surrounding "
            f"spaces, and not {OPERATOR!r}"
        )


def _pem_key(k: ec.EllipticCurvePrivateKey) -> bytes:
    return k.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem_cert(c: x509.Certificate) -> bytes:
    return c.public_bytes(serialization.Encoding.PEM)


def _issue(
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    cn: str,
    public_key: Any,
    usage: x509.ObjectIdentifier,
    sans: Sequence[x509.GeneralName] = (),
    *,
    days: int = 365,
) -> x509.Certificate:
    """A leaf certificate for ``public_key`` named ``cn``, signed by the CA."""
    now = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return b.sign(ca_key, hashes.SHA256())


def _new_ca(days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedloom CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return ca, key


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    missing = [f for f in ("ca.pem", "ca.key") if not (directory / f).is_file()]
    if missing:
        raise AuthError(
            f"{directory} holds no CA ({', '.join(missing)} missing); create it with `fedloom certs`"
        )
    ca = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise AuthError(f"{directory / 'ca.key'} is not an elliptic-curve key")
    return ca, key


def _read_book(directory: Path) -> dict[str, dict[str, Any]]:
    path = directory / TOKENS
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text(encoding="utf-8"))["clients"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AuthError(f"token file {path} is unreadable: {exc}") from None


def _write_book(directory: Path, book: dict[str, dict[str, Any]]) -> None:
    path = directory / TOKENS
    tmp = path.with_name(TOKENS + ".tmp")
    tmp.write_text(json.dumps({"clients": book}, indent=2), encoding="utf-8")
    tmp.replace(path)  # the server re-reads the file on change: it must never see half of it


def _client_bundle(
    d: Path, ca: x509.Certificate, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None
) -> str:
    """Write ``d/{cert.pem,ca.pem,token}`` (and ``key.pem`` when given); returns the new token."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "cert.pem").write_bytes(_pem_cert(cert))
    (d / "ca.pem").write_bytes(_pem_cert(ca))
    if key is not None:
        _write_private(d / "key.pem", _pem_key(key))
    token = secrets.token_urlsafe(32)
    _write_private(d / "token", token.encode("ascii"))
    return token


def generate_credentials(
    out: Path,
    clients: Sequence[str],
    *,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    days: int = 365,
    force: bool = False,
    add: bool = False,
) -> list[str]:
    """Write a CA, a server certificate, per-client certificates and tokens (see :mod:`fedloom.net.auth`).

    ``out`` must not hold credentials yet (:class:`AuthError` otherwise) unless ``add``
    (issue bundles, with the existing CA, for the names not yet in ``tokens.json``, keeping
    every existing certificate and token) or ``force`` (replace the CA and everything).
    Returns the names whose credentials were written.
    """
    for c in clients:
        check_client_name(c)
    if len(set(clients)) != len(clients):
        raise AuthError(f"client names must be unique: {list(clients)}")
    present = [f for f in CA_FILES if (out / f).exists()]
    if add:
        ca, ca_key = _load_ca(out)
        book = _read_book(out)
        new = [c for c in clients if c not in book]
        for name in new:
            key = ec.generate_private_key(ec.SECP256R1())
            cert = _issue(ca, ca_key, name, key.public_key(), ExtendedKeyUsageOID.CLIENT_AUTH, days=days)
            token = _client_bundle(out / "clients" / name, ca, cert, key)
            book[name] = {"sha256": _digest(token), "revoked": False}
        _write_book(out, book)
        return new
    if present and not force:
        raise AuthError(
            f"{out} already holds credentials ({', '.join(present)}): creating them again would replace the "
            "CA and every client's certificate and token, locking out every site. Use --add to issue "
            "credentials for new clients with the existing CA, or --force to replace everything"
        )
    ca, ca_key = _new_ca(days)
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    out.mkdir(parents=True, exist_ok=True)
    (out / "ca.pem").write_bytes(_pem_cert(ca))
    _write_private(out / "ca.key", _pem_key(ca_key))
    key = ec.generate_private_key(ec.SECP256R1())
    server = hosts[0] if hosts else "localhost"
    cert = _issue(ca, ca_key, server, key.public_key(), ExtendedKeyUsageOID.SERVER_AUTH, sans, days=days)
    (out / "server.pem").write_bytes(_pem_cert(cert))
    _write_private(out / "server.key", _pem_key(key))
    book = {}
    for name in clients:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(ca, ca_key, name, key.public_key(), ExtendedKeyUsageOID.CLIENT_AUTH, days=days)
        token = _client_bundle(out / "clients" / name, ca, cert, key)
        book[name] = {"sha256": _digest(token), "revoked": False}
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _issue(ca, ca_key, OPERATOR, key.public_key(), ExtendedKeyUsageOID.CLIENT_AUTH, days=days)
    (out / "operator.pem").write_bytes(_pem_cert(cert))
    _write_private(out / "operator.key", _pem_key(key))
    op = secrets.token_urlsafe(32)
    _write_private(out / "operator.token", op.encode("ascii"))
    book[OPERATOR] = {"sha256": _digest(op), "revoked": False}
    _write_book(out, book)
    return list(clients)


def request_certificate(out: Path, name: str, *, force: bool = False) -> Path:
    """A site's side: write a new private key ``out/key.pem`` (mode 0600) and ``out/<name>.csr``.

    The key never leaves ``out``; send the CSR to the operator. Refuses to overwrite an
    existing ``key.pem`` unless ``force``. Returns the CSR's path.
    """
    check_client_name(name)
    if (out / "key.pem").exists() and not force:
        raise AuthError(
            f"{out / 'key.pem'} already exists: a new key would orphan the certificate issued for it; "
            "use --force to replace it"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    _write_private(out / "key.pem", _pem_key(key))
    path = out / f"{name}.csr"
    path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    return path


def _check_csr(csr_path: Path, name: str) -> x509.CertificateSigningRequest:
    try:
        csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise AuthError(f"{csr_path} is not a PEM certificate signing request: {exc}") from None
    try:
        valid = csr.is_signature_valid
    except (UnsupportedAlgorithm, ValueError) as exc:
        raise AuthError(f"{csr_path}: its signature cannot be checked ({exc})") from None
    if not valid:
        raise AuthError(
            f"{csr_path}: the request's signature does not verify against its public key (altered or "
            "forged in transit); ask the site for a new one"
        )
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        raise AuthError(f"{csr_path}: the request must name exactly one common name, it has {len(cns)}")
    cn = str(cns[0].value)
    if cn != name:
        raise AuthError(f"{csr_path}: the request is for {cn!r}, not for the expected client {name!r}")
    key = csr.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise AuthError(f"{csr_path}: RSA key of {key.key_size} bits; at least 2048 are required")
    elif not isinstance(key, ec.EllipticCurvePublicKey):
        raise AuthError(f"{csr_path}: unsupported key type {type(key).__name__} (use EC P-256 or RSA)")
    return csr


def sign_request(
    ca_dir: Path, csr_path: Path, *, name: str, out: Path | None = None, days: int = 365, force: bool = False
) -> Path:
    """The operator's side: check ``csr_path`` and issue the client certificate for ``name``.

    The CSR's signature must verify and its common name must be ``name`` (:class:`AuthError`
    otherwise). Writes ``out/{cert.pem,ca.pem,token}`` (default ``ca_dir/clients/<name>``)
    and registers the token's digest in ``ca_dir/tokens.json``; a name already registered
    is refused unless ``force`` (a new token and certificate replace the old ones).
    Returns ``out``.
    """
    check_client_name(name)
    csr = _check_csr(csr_path, name)
    ca, ca_key = _load_ca(ca_dir)
    book = _read_book(ca_dir)
    if name in book and not force:
        raise AuthError(
            f"client {name!r} already has credentials in {ca_dir / TOKENS}; use --force to replace its "
            "certificate and token"
        )
    target = out if out is not None else ca_dir / "clients" / name
    if (target / "key.pem").exists():
        # A bundle made by `fedloom certs` holds the old key; a cert beside it that matches another key breaks it.
        raise AuthError(f"{target} holds a private key made by the operator; choose another --out")
    cert = _issue(ca, ca_key, name, csr.public_key(), ExtendedKeyUsageOID.CLIENT_AUTH, days=days)
    token = _client_bundle(target, ca, cert, None)
    book[name] = {"sha256": _digest(token), "revoked": False}
    _write_book(ca_dir, book)
    return target
