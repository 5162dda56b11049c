"""What a refused caller (no valid credential) may cost the server: a bounded record, one answer.

A caller that fails authentication has proved nothing, so nothing it sends may grow the
server's state without bound, and nothing in the answer may tell it more than "refused":

* :data:`REFUSED` is the one message every refused caller gets back, whether the name is
  unknown, the token wrong or the certificate someone else's (a message that differed
  would tell which client names exist). Only a caller that proved its identity and is
  revoked is told so (:class:`RefusalGate` is not involved then: see :mod:`fedloom.net.auth`).
* :func:`clip_name` cuts what the caller claims (its name, its address) before it is
  written anywhere.
* :class:`RefusalGate` is a token bucket on the audit rows and log lines of refusals:
  ``burst`` at once, then ``per_minute``; the refusals it suppresses are counted, and the
  next record written carries that count.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["REFUSED", "RefusalGate", "clip_name"]

REFUSED = "not authenticated: unknown client name or invalid credential"

#: Characters of a claimed name or peer address kept in a record.
NAME_CHARS = 64


def clip_name(text: str, limit: int = NAME_CHARS) -> str:
    """``text`` cut to ``limit`` characters, with how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


class RefusalGate:
    """A token bucket deciding which refusals get an audit row and a log line (thread-safe).

    ``clock`` returns seconds (monotonic); tests pass their own.
    """

    def __init__(
        self, *, burst: int = 20, per_minute: float = 20.0, clock: Callable[[], float] = time.monotonic
    ):
        if burst < 1 or per_minute <= 0:
            raise ValueError(f"RefusalGate needs burst >= 1 and per_minute > 0, got {burst}, {per_minute}")
        self._burst, self._rate, self._clock = float(burst), per_minute / 60.0, clock
        self._tokens, self._at = float(burst), clock()
        self._lock = threading.Lock()
        self.total = 0  # every refusal, recorded or not
        self._suppressed = 0  # refusals not recorded since the last record

    def admit(self) -> int | None:
        """Count one refusal; the number suppressed before it if it is to be recorded, else ``None``."""
        with self._lock:
            self.total += 1
            now = self._clock()
            self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
            self._at = now
            if self._tokens < 1.0:
                self._suppressed += 1
                return None
            self._tokens -= 1.0
            suppressed, self._suppressed = self._suppressed, 0
            return suppressed

    @property
    def suppressed(self) -> int:
        """Refusals not recorded since the last record."""
        with self._lock:
            return self._suppressed
