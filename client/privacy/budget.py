"""A site's privacy budget: what a round would cost (by the site's ``dp-accountant``, both
accountants reported), and whether the site agrees to spend it."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from client.privacy.ledger import PrivacyLedger, Spend, account
from common.errors import ConfigError, DataError, PrivacyError
from common.privacy import PrivacySettings
from common.training import TrainConfig

_EPSILON_SLACK = 1e-9  # float noise when comparing an epsilon to a budget computed the same way
# dp-target-epsilon's calibration stops once the planned rounds cost between target - this and
# target (Opacus get_noise_multiplier's epsilon_tolerance, for both accountants)
SIGMA_TOLERANCE = 0.01


@dataclass
class RoundPlan:
    """What a round would cost, and whether the site agrees to spend it.

    Each cost is a ``Spend``: RDP's and PLD's epsilon at ``delta``, and the governing one (the
    site's ``dp-accountant``, or RDP where PLD is not computed or not tighter); ``epsilon_*`` are
    the governing accountant's numbers.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    expected_batch_size: int
    delta: float
    before: Spend  # the scope's total before this round
    this_round: Spend  # this round on its own
    after: Spend  # the scope's total if this round trains
    declined: bool = False
    reason: str = ""
    # the scope's ledger history before this round: (noise multiplier, sample rate, steps) entries
    history: list[tuple[float, float, int]] = field(default_factory=list)

    @property
    def epsilon_before(self) -> float:
        return self.before.epsilon

    @property
    def epsilon_round(self) -> float:
        """This round on its own, by the accountant that governs the total (``after``)."""
        if self.after.accountant == "pld" and self.this_round.pld is not None:
            return self.this_round.pld
        return self.this_round.rdp

    @property
    def epsilon_after(self) -> float:
        return self.after.epsilon

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
    such rounds cost ``target_epsilon`` in total by the site's accountant (``_calibrated_sigma``,
    tolerance ``SIGMA_TOLERANCE``), the same sigma every round; a round beyond that target is
    declined. Budgets (``max_epsilon``, the target) are checked with the governing epsilon.
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
    accountant, delta = privacy.accountant, privacy.delta
    plan = RoundPlan(
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        steps=steps,
        expected_batch_size=batch,
        delta=delta,
        before=account(history, delta, accountant),
        this_round=account(this_round, delta, accountant),
        after=account(history + this_round, delta, accountant),
        history=history,
    )
    limit = privacy.max_epsilon
    if limit is not None and plan.epsilon_after > limit + _EPSILON_SLACK:
        plan.declined = True
        plan.reason = (
            f"privacy budget: this round would bring the site's epsilon from "
            f"{plan.epsilon_before:.4g} to {plan.epsilon_after:.4g} > dp-max-epsilon {limit:g} "
            f"({_named(plan.after)}, delta {delta:g}, ledger scope '{privacy.ledger_scope}')"
        )
    elif privacy.target_epsilon is not None:
        run_after = (
            plan.after
            if privacy.ledger_scope == "run"
            else account(ledger.history(scope="run", run_id=run_id) + this_round, delta, accountant)
        )
        if run_after.epsilon > privacy.target_epsilon + _EPSILON_SLACK:
            plan.declined = True
            plan.reason = (
                f"privacy target: this run would reach epsilon {run_after.epsilon:.4g} "
                f"({_named(run_after)}) > dp-target-epsilon {privacy.target_epsilon:g} "
                f"(planned {planned_rounds} rounds)"
            )
    return plan


def _named(spend: Spend) -> str:
    """The governing accountant as a reason names it: ``PLD``, ``RDP``, or ``RDP: <why>``."""
    return spend.accountant.upper() + (f": {spend.note}" if spend.note else "")


# (accountant, target epsilon, delta, sample rate, steps) -> sigma: a site plans every round of a
# run alike, and each search costs about a second of CPU.
_SIGMAS: dict[tuple[str, float, float, float, int], float] = {}


def _calibrated_sigma(privacy: PrivacySettings, sample_rate: float, total_steps: int) -> float:
    """The smallest sigma (within ``SIGMA_TOLERANCE`` of the target) whose ``total_steps`` steps
    at ``sample_rate`` cost at most dp-target-epsilon by the site's accountant.

    RDP: Opacus' get_noise_multiplier. PLD: bisection on ``account(..., "pld")`` between 0 and
    RDP's sigma (whose governing cost is at most its RDP cost, so within the target); the sigma
    returned is one whose cost was computed and is within the target, so the budget check of
    the planned rounds (the same computation: entries of one mechanism merge) admits them.
    """
    if total_steps < 1:
        raise ConfigError("privacy: dp-target-epsilon needs at least one training step per round")
    assert privacy.target_epsilon is not None
    target, delta = privacy.target_epsilon, privacy.delta
    key = (privacy.accountant, target, delta, sample_rate, total_steps)
    if key in _SIGMAS:
        return _SIGMAS[key]
    rdp_key = ("rdp", target, delta, sample_rate, total_steps)
    if rdp_key not in _SIGMAS:
        _SIGMAS[rdp_key] = _rdp_sigma(target, delta, sample_rate, total_steps)
    if privacy.accountant == "rdp":
        return _SIGMAS[rdp_key]

    def cost(sigma: float) -> float:
        with warnings.catch_warnings():  # small trial sigmas hit Opacus' largest RDP order
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return account([(sigma, sample_rate, total_steps)], delta, privacy.accountant).epsilon

    low, high = 0.0, _SIGMAS[rdp_key]
    cost_high = cost(high)
    # a cost with a jump (where PLD stops being computed) may never come within the tolerance:
    # the bracket's width then ends the search
    while target - cost_high > SIGMA_TOLERANCE and high - low > 1e-6 * high:
        middle = (low + high) / 2
        spent = cost(middle)
        if spent <= target:
            high, cost_high = middle, spent
        else:
            low = middle
    _SIGMAS[key] = high
    return high


def _rdp_sigma(target: float, delta: float, sample_rate: float, total_steps: int) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():  # the search's large trial sigmas hit the largest order
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return float(
                get_noise_multiplier(
                    target_epsilon=target,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=total_steps,
                    accountant="rdp",
                )
            )
    except ValueError as exc:
        raise PrivacyError(
            f"dp-target-epsilon {target:g} is unreachable for {total_steps} steps "
            f"at sample rate {sample_rate:.4g} ({exc}); raise it or train fewer rounds/epochs"
        ) from exc
