"""Allocator settings for the server and client processes (glibc only; elsewhere a no-op).

Every round a deployed process allocates and frees a few model-sized buffers per
client: gRPC's receive slices, the Python ``bytes`` of each message, the decoded
tensors. glibc serves an allocation above its mmap threshold with a fresh ``mmap``
(128 KiB at start, raised only when such a block is freed) and gives freed memory
at the top of a heap back to the kernel above its trim threshold, so in steady
state each 0.8 MB buffer is faulted in page by page and unmapped again: about a
fifth of a load generator's CPU on loopback (``perf``: ``exc_page_fault``,
``clear_page``, ``unmap_page_range``). Raising both thresholds keeps freed buffers
in the process for the next round. The cost is that memory freed after a peak is
kept (up to ``trim_bytes``, 128 MiB by default, per heap) instead of returned; the
process's resident size stays near its peak working set. Buffers of more than 32 MiB
(glibc's ceiling for the mmap threshold) are still mapped and unmapped each time, so
large models keep glibc's default behaviour and only mid-sized buffers are reused.

With 20 clients on 2 cores (``benchmarks/bench_net.py``), keeping freed buffers
takes about a quarter off a round of the bare-gRPC floor and a fifth off fedloom's
overhead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["keep_freed_buffers"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc caps M_MMAP_THRESHOLD at HEAP_MAX_SIZE / 2 (32 MiB on 64-bit); larger requests fail.
_MMAP_MAX = 32 * 1024 * 1024


def keep_freed_buffers(*, mmap_bytes: int = _MMAP_MAX, trim_bytes: int = 128 * 1024 * 1024) -> bool:
    """Raise glibc's mmap and trim thresholds (see the module docstring); ``True`` if applied.

    Returns ``False`` without changing anything on a C library without ``mallopt``
    (musl, macOS, Windows) or when glibc refuses the values.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, min(mmap_bytes, _MMAP_MAX)) == 1
    return bool(mallopt(_M_TRIM_THRESHOLD, min(trim_bytes, 2**31 - 1)) == 1 and ok)
