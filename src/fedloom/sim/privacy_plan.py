"""Turn the ``[privacy]`` config into a DP transform stage and a privacy ledger.

The ledger answers "what epsilon has the run spent after r rounds" and "would
round r exceed the budget". Central-family modes account for the sampling the
runtimes really do: with ``sampling.scheme = "fixed"`` a fixed-size cohort drawn
without replacement (:class:`~fedloom.privacy.accounting.FixedSizeSampling`,
RDP only, neighbouring datasets differ by replacing one client); with
``"poisson"`` Poisson sampling at rate ``sampling.fraction``
(:class:`~fedloom.privacy.accounting.PoissonSampling`, RDP or PLD, neighbours
differ by adding or removing one client), where the noised mean divides by the
fixed expected cohort ``fraction * population`` unless
``privacy.expected_clients`` says otherwise. Local DP accounts per
client with :func:`~fedloom.privacy.accounting.local_epsilon`, pessimistically
assuming the client took part in every round so far. ``dp-accounting`` is
imported only when DP is on (it lives in the ``privacy`` extra).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from fedloom.config.schema import ExperimentConfig
from fedloom.core.errors import ConfigError
from fedloom.sim.sampling import cohort_size
from fedloom.transforms.pipeline import Identity, UpdateTransform

if TYPE_CHECKING:  # dp-accounting lives in the optional 'privacy' extra
    from fedloom.privacy.accounting import FixedSizeSampling, PoissonSampling

__all__ = ["PrivacyPlan", "deployed_amplification_loss", "plan_privacy"]


@dataclass(frozen=True)
class PrivacyPlan:
    """The DP stage of the pipeline and the accounting for the run."""

    stage: UpdateTransform
    noise_multiplier: float
    delta: float
    budget: float
    mode: str
    cohort: int
    population: int
    accountant: str
    scheme: str = "fixed"
    rate: float = 1.0
    # Why the accountant may not count on amplification by sampling ("": it may).
    no_amplification: str = ""

    @property
    def amplification(self) -> bool:
        """Whether the ledger credits amplification by sampling (see :func:`plan_privacy`)."""
        return not self.no_amplification

    def sampling(self) -> FixedSizeSampling | PoissonSampling:
        """The sampling event the accountant composes each round: the configured one, or, without
        amplification, every contributor in every round (rate 1, a plain composition)."""
        from fedloom.privacy.accounting import FixedSizeSampling, PoissonSampling

        if self.no_amplification:
            return FixedSizeSampling(self.cohort, self.cohort)
        if self.scheme == "poisson":
            return PoissonSampling(self.rate)
        return FixedSizeSampling(self.cohort, self.population)

    def epsilon_after(self, rounds: int) -> float:
        """Epsilon spent after ``rounds`` completed rounds (an upper bound for local DP)."""
        from fedloom.privacy.accounting import epsilon, local_epsilon

        if rounds <= 0 or self.noise_multiplier == 0:
            return 0.0 if rounds <= 0 else float("inf")
        if self.mode == "local":
            return local_epsilon(self.noise_multiplier, rounds, self.delta, accountant=self.accountant)
        return epsilon(self.noise_multiplier, self.sampling(), rounds, self.delta, accountant=self.accountant)

    def would_exceed(self, next_round: int) -> bool:
        return self.budget > 0 and self.epsilon_after(next_round) > self.budget


def plan_privacy(
    cfg: ExperimentConfig,
    *,
    population: int | None = None,
    secure_noise: bool = False,
    deployed: bool = False,
) -> PrivacyPlan | None:
    """The plan for ``cfg`` (``None`` when ``privacy.mode = "off"``).

    ``population`` is the number of clients cohorts are drawn from (default
    ``data.num_clients``; the deployment passes its registry size). The deployment
    also sets ``secure_noise``: noise from the OS CSPRNG instead of the seed. With
    ``privacy.target_epsilon > 0`` the noise multiplier is calibrated so that
    ``cfg.rounds`` rounds spend at most that epsilon.

    ``deployed``: the plan is for the gRPC deployment (server and clients both pass it, so that they
    agree on a calibrated sigma). There amplification by sampling is credited only when the
    contributors are the uniform fixed-size sample the accountant assumes; with
    ``deploy.overselect > 1`` they are the first selected clients to answer, and with
    ``deploy.select_online`` the cohort is drawn among the clients online; neither is, and the
    ledger composes the rounds without amplification (``PrivacyPlan.no_amplification`` says why).
    """
    p = cfg.privacy
    if p.mode == "off":
        return None
    try:
        from fedloom.privacy.calibrate import calibrate_noise_multiplier
        from fedloom.transforms.adaptive_clip import AdaptiveClipDP
        from fedloom.transforms.dp import CentralDP, ClientClipDP, LocalDP
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ConfigError(
            [f"privacy.mode = {p.mode!r} needs the privacy extra: pip install 'fedloom[privacy]' ({exc})"]
        ) from exc
    population = population if population is not None else cfg.data.num_clients
    s = cfg.sampling
    poisson = s.scheme == "poisson"
    # Under Poisson sampling the cohort size is random: the expected one stands in for it.
    cohort = (
        max(1, round(s.fraction * population))
        if poisson
        else cohort_size(population, s.fraction, s.min_clients)
    )
    sigma = p.noise_multiplier
    ledger = PrivacyPlan(
        stage=Identity(),  # replaced below, once sigma is known
        noise_multiplier=sigma,
        delta=p.delta,
        budget=p.budget_epsilon,
        mode=p.mode,
        cohort=cohort,
        population=population,
        accountant=p.accountant,
        scheme=s.scheme,
        rate=s.fraction,
        no_amplification=deployed_amplification_loss(cfg) if deployed else "",
    )
    if p.target_epsilon > 0:
        if p.mode == "local":
            raise ConfigError(["privacy.target_epsilon: calibration is for central modes, not 'local'"])
        sigma = calibrate_noise_multiplier(
            p.target_epsilon, p.delta, cfg.rounds, ledger.sampling(), accountant=p.accountant
        )
    # Poisson: McMahan et al.'s fixed-denominator estimator, the one the Poisson analysis covers.
    expected = p.expected_clients or (cohort if poisson else None)
    stage: UpdateTransform
    try:
        if p.mode == "central":
            stage = CentralDP(p.clip_norm, sigma, expected, secure_noise)
        elif p.mode == "client_clip":
            stage = ClientClipDP(p.clip_norm, sigma, expected, secure_noise)
        elif p.mode == "local":
            stage = LocalDP(p.clip_norm, sigma, secure_noise)
        else:
            count_std = p.count_noise_std or cohort / 20
            stage = AdaptiveClipDP(
                noise_multiplier=sigma,
                count_noise_std=count_std,
                initial_clip=p.clip_norm,
                target_quantile=p.target_quantile,
                clip_lr=p.clip_lr,
                expected_clients=expected,
                secure_noise=secure_noise,
            )
    except ValueError as exc:
        raise ConfigError([f"privacy: {exc}"]) from exc
    return replace(ledger, stage=stage, noise_multiplier=sigma)


def deployed_amplification_loss(cfg: ExperimentConfig) -> str:
    """Why a deployed run's contributors are not the uniform sample the accountant assumes ("": they are).

    A decision from the configuration alone, the same for every round, so the epsilon a run
    reports does not depend on who happened to answer.
    """
    reasons = []
    if cfg.deploy.overselect > 1:
        reasons.append(
            f"deploy.overselect = {cfg.deploy.overselect}: the contributors are the first selected "
            "clients to answer, not a uniform sample"
        )
    if cfg.deploy.select_online:
        reasons.append(
            "deploy.select_online: cohorts are drawn among the clients online, not from the population"
        )
    return "; ".join(reasons)
