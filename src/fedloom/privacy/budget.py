"""A privacy ledger the round loop asks before and after each round.

The ledger is a frozen description of the mechanism (σ, sampling, δ,
accountant); ε after ``r`` rounds is a pure function of it and ``r``, so nothing
needs checkpointing beyond the round number. Rounds in which every update was
dropped still count: the cohort was sampled and the analysis charges it.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedloom.privacy.accounting import AccountantName, Sampling, epsilon

__all__ = ["PrivacyLedger"]


@dataclass(frozen=True)
class PrivacyLedger:
    """ε spent by DP-FedAvg with noise multiplier ``noise_multiplier`` after a number of rounds.

    For adaptive clipping give the *total* noise multiplier ``z`` of
    :class:`~fedloom.transforms.adaptive_clip.AdaptiveClipDP` (the delta noise and
    the clipped-count noise compose to a Gaussian mechanism with multiplier ``z``).
    """

    noise_multiplier: float
    sampling: Sampling
    delta: float
    accountant: AccountantName = "rdp"

    def epsilon_after(self, rounds: int) -> float:
        """ε after ``rounds`` completed rounds (0 for 0 rounds)."""
        return epsilon(self.noise_multiplier, self.sampling, rounds, self.delta, accountant=self.accountant)

    def would_exceed(self, budget: float, next_round: int) -> bool:
        """Whether running round ``next_round`` (1-based) would take ε above ``budget``.

        The round loop calls this before sampling round ``next_round`` and stops
        (reason "privacy budget reached") when it returns True.
        """
        return self.epsilon_after(next_round) > budget

    def max_rounds(self, budget: float, *, limit: int = 100_000) -> int:
        """The largest number of rounds whose ε stays within ``budget`` (at most ``limit``)."""
        if self.would_exceed(budget, 1):
            return 0
        lo, hi = 1, 2
        while hi <= limit and not self.would_exceed(budget, hi):
            lo, hi = hi, hi * 2
        if hi > limit:
            if not self.would_exceed(budget, limit):
                return limit
            hi = limit
        while hi - lo > 1:  # invariant: lo within budget, hi over it
            mid = (lo + hi) // 2
            if self.would_exceed(budget, mid):
                hi = mid
            else:
                lo = mid
        return lo
