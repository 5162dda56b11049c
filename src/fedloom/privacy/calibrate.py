"""Choose the smallest noise multiplier that meets a target ε.

:func:`calibrate_noise_multiplier` bisects on σ in the bracket it finds by
doubling/halving. It keeps the invariant ``ε(hi) <= target`` from the first
bracket step to the end and returns ``hi``, so the answer never overshoots the
target, even if the accountant's ε is not perfectly monotone in σ (floating
point, order grids): only values the accountant certified are ever returned.
"""

from __future__ import annotations

from fedloom.privacy.accounting import AccountantName, Sampling, epsilon

__all__ = ["calibrate_noise_multiplier"]


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    rounds: int,
    sampling: Sampling,
    *,
    accountant: AccountantName = "rdp",
    pld_discretization: float = 1e-4,
    rtol: float = 1e-3,
    min_noise: float = 1e-2,
    max_noise: float = 1e4,
) -> float:
    """The smallest σ (up to relative ``rtol``) with ``epsilon(σ, ...) <= target_epsilon``.

    ``σ`` is the noise multiplier of :func:`~fedloom.privacy.accounting.epsilon`
    (noise std on the sum divided by the clip norm). Returns ``min_noise`` when
    even that meets the target. Raises ``ValueError`` naming the bad argument, or
    when no σ up to ``max_noise`` meets the target. ``accountant`` and
    ``pld_discretization`` are passed to the accountant; check the result with
    the same ones (e.g. ε too small for the
    number of rounds).

    Notes
    -----
    The result is an upper end of a bisection bracket that the accountant
    itself certified, so ``epsilon(result, ...) <= target_epsilon`` holds exactly
    (a property test checks it). Over-delivering privacy by at most ``rtol``
    relative noise is the price of never under-delivering it.
    """
    problems = []
    if not target_epsilon > 0:
        problems.append(f"target_epsilon must be > 0, got {target_epsilon}")
    if rounds < 1:
        problems.append(f"rounds must be >= 1, got {rounds}")
    if not 0 < rtol < 1:
        problems.append(f"rtol must be in (0, 1), got {rtol}")
    if not 0 < min_noise < max_noise:
        problems.append(f"need 0 < min_noise < max_noise, got {min_noise}, {max_noise}")
    if problems:
        raise ValueError("; ".join(problems))

    def ok(sigma: float) -> bool:
        eps = epsilon(
            sigma, sampling, rounds, delta, accountant=accountant, pld_discretization=pld_discretization
        )
        return eps <= target_epsilon

    hi = min(max(1.0, min_noise), max_noise)
    if ok(hi):
        lo = hi / 2
        while lo >= min_noise and ok(lo):
            hi, lo = lo, lo / 2
        if lo < min_noise:
            if ok(min_noise):
                return min_noise
            lo = min_noise
    else:
        lo = hi
        while not ok(hi):
            lo, hi = hi, hi * 2
            if hi > max_noise:
                raise ValueError(
                    f"no noise multiplier up to {max_noise} reaches epsilon {target_epsilon} at "
                    f"delta {delta} after {rounds} rounds with {sampling}"
                )
    # Invariant: ok(hi) is True, ok(lo) is False (or lo is the unchecked lower limit).
    while hi - lo > rtol * hi:
        mid = (lo + hi) / 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi
