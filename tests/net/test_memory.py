"""The allocator settings of the deployed processes (fedloom.net.memory), measured by page faults."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from fedloom.net.memory import keep_freed_buffers

# A process that serves itself a 0.8 MB blob over loopback gRPC and prints the minor page
# faults per Fetch in steady state. argv[1] == "1" applies keep_freed_buffers() first; "0" pins
# glibc's default thresholds (128 KiB), which also turns off glibc's own dynamic raising of them, so
# the control maps every 0.8 MB buffer afresh whatever the scheduling of the run.
_PROBE = textwrap.dedent(
    """
    import os, resource, sys
    from concurrent.futures import ThreadPoolExecutor
    import grpc
    from fedloom.net.memory import keep_freed_buffers
    if sys.argv[1] == "1":
        assert keep_freed_buffers()
    else:
        assert keep_freed_buffers(mmap_bytes=128 * 1024, trim_bytes=128 * 1024)
    blob = os.urandom(800_000)
    raw = lambda b: b
    handler = grpc.method_handlers_generic_handler(
        "t", {"F": grpc.unary_unary_rpc_method_handler(lambda r, c: blob, raw, raw)}
    )
    server = grpc.server(ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    opts = [("grpc.max_receive_message_length", 8 << 20)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=opts) as ch:
        fetch = ch.unary_unary("/t/F", request_serializer=raw, response_deserializer=raw)
        for _ in range(20):
            assert fetch(b"") == blob
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(50):
            fetch(b"")
        print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 50)
    server.stop(0)
    """
)

linux_glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or "glibc" not in " ".join(__import__("platform").libc_ver()),
    reason="mallopt thresholds are a glibc feature",
)


def _faults_per_fetch(tuned: bool) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, "1" if tuned else "0"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return float(out.stdout.strip().splitlines()[-1])


@linux_glibc
def test_received_buffers_are_reused_not_faulted_in_again() -> None:
    # An 0.8 MB buffer spans 196 pages: mapped afresh for every message, it faults each one in.
    pages = 800_000 / 4096
    tuned = _faults_per_fetch(True)
    assert tuned < 0.25 * pages, f"{tuned} minor faults per 0.8 MB fetch with the thresholds raised"
    # The control shows the probe sees the faults it is meant to catch.
    control = _faults_per_fetch(False)
    assert control > 0.75 * pages, f"{control} minor faults per fetch with glibc's default thresholds pinned"


@linux_glibc
def test_keep_freed_buffers_reports_it_applied() -> None:
    assert keep_freed_buffers() is True
