"""A site's privacy budget: what a round would cost (RDP), and whether the site agrees to spend it."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from client.privacy.ledger import PrivacyLedger, rdp_epsilon
from common.errors import ConfigError, DataError, PrivacyError
from common.privacy import PrivacySettings
from common.training import TrainConfig

_EPSILON_SLACK = 1e-9  # float noise when comparing an epsilon to a budget computed the same way


@dataclass
class RoundPlan:
    """What a round would cost, and whether the site agrees to spend it."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    expected_batch_size: int
    delta: float
    epsilon_before: float  # the scope's total before this round
    epsilon_round: float  # this round on its own
    epsilon_after: float  # the scope's total if this round trains
    declined: bool = False
    reason: str = ""
    # the scope's ledger history before this round: (noise multiplier, sample rate, steps) entries
    history: list[tuple[float, float, int]] = field(default_factory=list)

    @property
    def history_after(self) -> list[tuple[float, float, int]]:
        """The scope's history once this round counts."""
        return [*self.history, (self.noise_multiplier, self.sample_rate, self.steps)]


def plan_round(
    privacy: PrivacySettings,
    *,
    ledger: PrivacyLedger,
    num_examples: int,
    config: TrainConfig,
    planned_rounds: int,
    run_id: int,
) -> RoundPlan:
    """The round's noise multiplier, sample rate and steps, its cost, and the budget decision.

    Sample rate ``q = B / n`` with ``B = min(batch_size, n)``; ``epochs * max(1, n // B)`` steps
    (as non-private training). With ``target_epsilon``, sigma is chosen so that ``planned_rounds``
    such rounds cost ``target_epsilon`` in total (Opacus get_noise_multiplier, RDP, tolerance
    0.01), the same sigma every round; a round beyond that target is declined.
    """
    if not privacy.requested:
        raise ConfigError(
            "privacy: DP is not configured (dp-noise-multiplier or dp-target-epsilon)"
        )
    if not privacy.enabled:
        raise PrivacyError(
            "training must be private (dp-max-epsilon is set) but neither dp-noise-multiplier nor "
            "dp-target-epsilon is configured: refusing to train without noise"
        )
    if planned_rounds < 1:
        raise ConfigError(f"privacy: planned rounds must be >= 1, got {planned_rounds}")
    if num_examples < 1:
        raise DataError("private training needs at least one labelled example")
    if privacy.delta >= 1.0 / num_examples:
        raise PrivacyError(
            f"dp-delta {privacy.delta:g} is not below 1/n = 1/{num_examples}: such a delta "
            "allows releasing an example outright; use a smaller dp-delta"
        )
    batch = min(config.batch_size, num_examples)
    sample_rate = batch / num_examples
    steps = config.epochs * max(1, num_examples // batch)
    sigma = privacy.noise_multiplier
    if sigma is None:
        assert privacy.target_epsilon is not None
        sigma = _calibrated_sigma(privacy, sample_rate, steps * planned_rounds)
    scope_run = run_id if privacy.ledger_scope == "run" else None
    history = ledger.history(scope=privacy.ledger_scope, run_id=scope_run)
    this_round = [(sigma, sample_rate, steps)]
    plan = RoundPlan(
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        steps=steps,
        expected_batch_size=batch,
        delta=privacy.delta,
        epsilon_before=rdp_epsilon(history, privacy.delta),
        epsilon_round=rdp_epsilon(this_round, privacy.delta),
        epsilon_after=rdp_epsilon(history + this_round, privacy.delta),
        history=history,
    )
    limit = privacy.max_epsilon
    if limit is not None and plan.epsilon_after > limit + _EPSILON_SLACK:
        plan.declined = True
        plan.reason = (
            f"privacy budget: this round would bring the site's epsilon from "
            f"{plan.epsilon_before:.4g} to {plan.epsilon_after:.4g} > dp-max-epsilon {limit:g} "
            f"(delta {privacy.delta:g}, ledger scope '{privacy.ledger_scope}')"
        )
    elif privacy.target_epsilon is not None:
        run_history = ledger.history(scope="run", run_id=run_id) + this_round
        run_after = rdp_epsilon(run_history, privacy.delta)
        if run_after > privacy.target_epsilon + _EPSILON_SLACK:
            plan.declined = True
            plan.reason = (
                f"privacy target: this run would reach epsilon {run_after:.4g} > "
                f"dp-target-epsilon {privacy.target_epsilon:g} (planned {planned_rounds} rounds)"
            )
    return plan


# (target epsilon, delta, sample rate, steps) -> sigma: a site plans every round of a run alike,
# and Opacus' search costs about a second of CPU each time.
_SIGMAS: dict[tuple[float | None, float, float, int], float] = {}


def _calibrated_sigma(privacy: PrivacySettings, sample_rate: float, total_steps: int) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    if total_steps < 1:
        raise ConfigError("privacy: dp-target-epsilon needs at least one training step per round")
    key = (privacy.target_epsilon, privacy.delta, sample_rate, total_steps)
    if key in _SIGMAS:
        return _SIGMAS[key]
    try:
        with warnings.catch_warnings():  # the search's large trial sigmas hit the largest order
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            _SIGMAS[key] = float(
                get_noise_multiplier(
                    target_epsilon=privacy.target_epsilon,
                    target_delta=privacy.delta,
                    sample_rate=sample_rate,
                    steps=total_steps,
                    accountant="rdp",
                )
            )
    except ValueError as exc:
        raise PrivacyError(
            f"dp-target-epsilon {privacy.target_epsilon:g} is unreachable for {total_steps} steps "
            f"at sample rate {sample_rate:.4g} ({exc}); raise it or train fewer rounds/epochs"
        ) from exc
    return _SIGMAS[key]
