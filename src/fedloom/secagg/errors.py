"""Secure-aggregation errors, a branch of the fedloom exception tree.

::

    FedloomError                       (fedloom.core.errors)
    ├── ConfigError                    invalid parameters (threshold, bits, clip range, graph)
    └── SecAggError                    a secure-aggregation round failed; no sum is returned
        ├── SecAggAbort                too few clients survived for the threshold
        ├── ShareDecryptionError       an encrypted share failed authentication (names the sender)
        └── ProtocolViolation          a message is malformed or inconsistent with the round state

Every failure mode of a round raises one of these *instead of* returning a sum:
the protocol never hands back a partial or unverifiable aggregate.
"""

from __future__ import annotations

from fedloom.core.errors import FedloomError

__all__ = ["ProtocolViolation", "SecAggAbort", "SecAggError", "ShareDecryptionError"]


class SecAggError(FedloomError):
    """A secure-aggregation round failed; the round produced no aggregate."""


class SecAggAbort(SecAggError):
    """Fewer clients than the threshold remain, so the masks cannot be removed.

    ``needed`` is the threshold and ``available`` the count that was found.
    """

    def __init__(self, message: str, *, needed: int, available: int) -> None:
        self.needed = needed
        self.available = available
        super().__init__(f"{message}: {available} available, threshold {needed}; the round is aborted")


class ShareDecryptionError(SecAggError):
    """An encrypted share from ``sender`` to ``receiver`` failed AEAD authentication.

    Either the sender or the relaying server altered it (or a key is wrong).
    """

    def __init__(self, *, sender: int, receiver: int) -> None:
        self.sender = sender
        self.receiver = receiver
        super().__init__(
            f"client {receiver}: the share sent by client {sender} failed authentication "
            "(tampered in transit or produced with the wrong key)"
        )


class ProtocolViolation(SecAggError):
    """A message is malformed, unexpected in the current round, or inconsistent with earlier ones."""
