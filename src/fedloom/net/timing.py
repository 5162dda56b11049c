"""Where a deployed round's wall time goes: per-phase timings, logged with ``round_committed``.

The RPC handlers of a round interleave (on the server's event loop), so their
per-client phases are reported twice: summed over clients (the server's work, which two cores share)
and as the moment, relative to the round's opening, when the last one finished
(the critical path). An update's arrival (the whole message received) and its
acceptance (decoded, validated, stored) are both timed: the gap between the last
arrival and the last acceptance is the ingest queue's lag. The round loop adds its own serial phases
(aggregate, evaluation, the wait for the previous round's commit) and the commit that runs in the
background while the next round does (``checkpoint_ms``); ``opened_at_s`` (seconds) is when the round
opened, so consecutive rounds give the time a round takes, open to open. The other values are
milliseconds of ``time.perf_counter``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

__all__ = ["RoundTiming"]


@dataclass
class RoundTiming:
    """Accumulates one round attempt's timings; the coordinator's lock guards the mutators."""

    opened: float = field(default_factory=time.perf_counter)
    downloads: int = 0
    download_sum: float = 0.0
    last_download: float = 0.0
    uploads: int = 0
    receive_sum: float = 0.0
    validate_sum: float = 0.0
    store_sum: float = 0.0
    first_arrival: float = 0.0
    last_arrival: float = 0.0
    first_accept: float = 0.0
    last_accept: float = 0.0
    closed: float = 0.0

    def add_download(self, start: float, end: float) -> None:
        self.downloads += 1
        self.download_sum += end - start
        self.last_download = max(self.last_download, end)

    def add_upload(
        self, receive_s: float, arrived: float, validate_s: float, store_s: float, end: float
    ) -> None:
        """An accepted update: fully ``arrived`` (the server's clock) and accepted at ``end``."""
        self.uploads += 1
        self.first_arrival = arrived if self.first_arrival == 0.0 else min(self.first_arrival, arrived)
        self.last_arrival = max(self.last_arrival, arrived)
        self.receive_sum += receive_s
        self.validate_sum += validate_s
        self.store_sum += store_s
        self.first_accept = end if self.first_accept == 0.0 else min(self.first_accept, end)
        self.last_accept = max(self.last_accept, end)

    def summary(self) -> dict[str, float]:
        """Milliseconds: ``*_sum_ms`` summed over clients, ``*_at_ms`` since the round opened."""

        def at(t: float) -> float:
            return round(1000 * (t - self.opened), 2) if t else 0.0

        return {
            "downloads": float(self.downloads),
            "download_sum_ms": round(1000 * self.download_sum, 2),
            "last_download_at_ms": at(self.last_download),
            "uploads": float(self.uploads),
            "upload_receive_sum_ms": round(1000 * self.receive_sum, 2),
            "upload_validate_sum_ms": round(1000 * self.validate_sum, 2),
            "upload_store_sum_ms": round(1000 * self.store_sum, 2),
            "first_arrival_at_ms": at(self.first_arrival),
            "last_arrival_at_ms": at(self.last_arrival),
            "first_accept_at_ms": at(self.first_accept),
            "last_accept_at_ms": at(self.last_accept),
            "closed_at_ms": at(self.closed),
        }
