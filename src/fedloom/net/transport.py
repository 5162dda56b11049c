"""When a connection may go without TLS, and what a failed connection most likely means (no grpc).

The rule, for the server's listening address and for a client's server address alike:
TLS is required unless the address is a loopback one (``127.0.0.0/8``, ``::1``,
``localhost``, or a ``unix:`` socket), where no byte leaves the machine. Plaintext to
or on any other address needs an explicit ``insecure=True`` (the CLI's ``--insecure``),
and the process then logs a ``plaintext`` warning line.

Notes
-----
Without TLS a client's token and every model travel in clear text, and nothing
authenticates the server to the client: whoever can reach the path can read the
updates and impersonate either side. Loopback is exempt because only processes on
the same machine can reach it, and they can read the files anyway.
"""

from __future__ import annotations

import re

from fedloom.core.errors import FedloomError
from fedloom.net.auth import is_loopback

__all__ = ["InsecureTransportError", "check_plaintext", "explain_connect_failure", "is_local_address"]


class InsecureTransportError(FedloomError):
    """Plaintext gRPC was asked for on a non-loopback address without the explicit opt-out."""


def _host(address: str) -> str:
    """The host part of a gRPC target: ``HOST:PORT``, ``[V6]:PORT``, ``dns:///HOST:PORT``, ``ipv4:HOST:PORT``."""
    target = address.strip()
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme) :]
            break
    if target.startswith("["):
        return target[1 : target.find("]")] if "]" in target else target
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return target  # no port given: the whole target is the host
    return host


def is_local_address(address: str) -> bool:
    """Whether the gRPC target ``address`` stays on this machine (loopback host or ``unix:`` socket)."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    return is_loopback(_host(address))


def check_plaintext(address: str, *, insecure: bool, role: str) -> bool:
    """Allow plaintext on ``address``, or raise :class:`InsecureTransportError`.

    Returns ``True`` when plaintext is allowed only because of ``insecure=True`` (the
    caller must then log a ``plaintext`` warning), ``False`` for a loopback address.
    ``role`` names the side in the message ("server --listen" or "client --server").
    """
    if is_local_address(address):
        return False
    if not insecure:
        raise InsecureTransportError(
            f"{role} {address} is not a loopback address and no TLS credentials were given: TLS is "
            "required (create them with `fedloom certs` and pass --tls-dir / Credentials(...)); to send "
            "tokens and models in clear text anyway pass --insecure (insecure=True), never in production"
        )
    return True


_OPENSSL_REASON = re.compile(r"OPENSSL_internal:([A-Z0-9_]+)")


def explain_connect_failure(details: str, *, tls: bool) -> tuple[str, bool]:
    """The likely cause of a failed gRPC connection, from grpc's error ``details``.

    Returns ``(cause, permanent)``: ``permanent`` is ``True`` when retrying cannot help
    (the TLS handshake failed on this client's side: its CA does not verify the server,
    or the server does not speak TLS), ``False`` for causes that may pass (no server
    listening yet, a connection closed by the server).
    """
    text = details or ""
    if "handshake failed" in text.lower():
        m = _OPENSSL_REASON.search(text)
        reason = m.group(1) if m else text.rsplit(": ", 2)[-1]
        if "WRONG_VERSION_NUMBER" in text:
            return (
                f"TLS handshake failed ({reason}): the server does not speak TLS (it listens in "
                "plaintext); give the server --tls-dir, or connect without TLS only on loopback",
                True,
            )
        if "Peer name" in text or "not in peer certificate" in text:
            return (
                f"TLS handshake failed: the server's certificate is not issued for this host name "
                f"({text.rsplit('last error: ', 1)[-1]}); recreate it with `fedloom certs --hosts`",
                True,
            )
        return (
            f"TLS handshake failed ({reason}): certificate verify failed: the server's certificate is "
            "not signed by this client's CA (ca.pem); use the ca.pem of the server's `fedloom certs` directory",
            True,
        )
    if "Socket closed" in text or "Connection reset" in text:
        if tls:
            return (
                "the server closed the connection during the TLS handshake: it likely refused this "
                "client's certificate (missing, expired, or not signed by the server's CA)",
                False,
            )
        return (
            "the server closed the connection during setup: it likely expects TLS; connect with the "
            "client's credentials (--tls-dir)",
            False,
        )
    if "Connection refused" in text:
        return "connection refused: no server listens at this address (not started yet, or wrong port)", False
    if "DNS resolution failed" in text:
        return "the server's host name does not resolve", False
    if "Deadline Exceeded" in text or "deadline" in text.lower():
        return "no answer before the deadline (server busy, or a firewall drops the packets)", False
    return text.rsplit("last error: ", 1)[-1] or "unavailable", False
