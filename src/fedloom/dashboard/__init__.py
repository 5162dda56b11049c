"""A read-only live web page for a running simulation or server (the ``dashboard`` extra).

The page follows a run directory's ``events.jsonl`` (see :mod:`fedloom.engine.events`) by
tailing the file and pushing each new event to the browser with server-sent events, so
it shows any run that writes the log (simulated or deployed, in this process or another)
and costs the run itself nothing beyond the log it writes anyway. Where a run directory
holds only ``metrics.jsonl``, its rows are served as round-committed events.
"""

from fedloom.dashboard.serve import DashboardServer, is_loopback, resolve_token, start_dashboard

__all__ = ["DashboardServer", "is_loopback", "resolve_token", "start_dashboard"]
