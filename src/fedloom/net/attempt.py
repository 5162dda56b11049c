"""What one deployed round attempt holds, and what it hands back when it closes (no grpc here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fedloom.algorithms.api import Broadcast, ClientUpdate, ServerContext
from fedloom.net.timing import RoundTiming
from fedloom.transforms.pipeline import Pipeline

if TYPE_CHECKING:  # fedloom.net.secure needs the optional 'secure' extra
    from fedloom.net.secure import SecureOutcome, SecureRelay

__all__ = ["Closed", "OpenAttempt", "Task"]


@dataclass(frozen=True)
class Task:
    """The answer to a client's GetTask: ``kind`` is "wait", "train" or "done"."""

    kind: str
    round: int = 0
    digest: str = ""
    size: int = 0
    xxh3: int = 0
    deadline_in_s: float = 0.0
    secagg_json: str = ""
    message: str = ""
    # non-empty: size and xxh3 are those of a patch against the broadcast of this digest
    base: str = ""


@dataclass(frozen=True)
class Closed:
    """What a closed round attempt produced (updates sorted by client id; none under SecAgg).

    ``secure`` is the secure sum of a secure round that completed, else ``None``.
    """

    updates: list[ClientUpdate]
    compute_s: dict[int, float]
    failed: dict[int, str]
    dropouts: list[int]
    timing: dict[str, float] = field(default_factory=dict)
    secure: SecureOutcome | None = None
    # (client id, reason) of every update refused while the attempt was open, in order
    rejected: list[tuple[int, str]] = field(default_factory=list)
    # accepted clients' update bytes as uploaded (secure rounds: the SecAgg messages each client sent,
    # every stage); bytes sent to the clients (the model; secure rounds: the SecAgg replies too)
    sizes: dict[int, int] = field(default_factory=dict)
    bytes_down: int = 0


@dataclass
class OpenAttempt:
    """A round attempt in the coordinator: its cohort, broadcast and what came back so far."""

    number: int
    attempt: int
    selected: frozenset[int]
    target: int
    deadline: float
    broadcast: Broadcast
    blob: bytes
    digest: str
    ctx: ServerContext
    pipeline: Pipeline
    xxh3: int = 0
    accepted: dict[int, ClientUpdate] = field(default_factory=dict)
    compute_s: dict[int, float] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    open: bool = True
    timing: RoundTiming = field(default_factory=RoundTiming)
    relay: SecureRelay | None = None
    rejected: list[tuple[int, str]] = field(default_factory=list)
    sizes: dict[int, int] = field(default_factory=dict)
    bytes_down: int = 0
    # compression.downlink_patch: on; the broadcast as a patch against the one of digest patch_base
    # (None: no patch smaller than the broadcast)
    patching: bool = False
    patch: bytes | None = None
    patch_base: str = ""
    patch_xxh3: int = 0

    def answered(self) -> bool:
        """Enough answers to close: the target of accepted updates, or every selected client heard."""
        return len(self.accepted) >= self.target or len(self.accepted) + len(self.failed) >= len(
            self.selected
        )
