"""Experiment trackers: observers of a run's events that write TensorBoard event files or MLflow runs.

Both read each committed round's metrics row (the :class:`~fedloom.engine.events.RoundCommitted`
event, identical to the round's ``metrics.jsonl`` line) and log every numeric value of it at
step = round, so what a tracker shows is exactly what ``metrics.jsonl`` holds. Each is an
optional extra; :func:`open_trackers` names the ``pip install`` command when one is missing.
"""

from fedloom.trackers.open import check_tracking_extras, open_trackers
from fedloom.trackers.scalars import round_scalars

__all__ = ["check_tracking_extras", "open_trackers", "round_scalars"]
