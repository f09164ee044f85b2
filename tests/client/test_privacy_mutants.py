"""The privacy ledger and budget at their edges, each pinned by a mutant that survived the older
tests (docs/results/mutation.md): what a ledger entry may hold, the run scope, the exclusive lock,
when PLD is computed, and how a round's sample rate, steps and budget decision are derived."""

from __future__ import annotations

import fcntl
import json
import re
from pathlib import Path

import pytest

from client.privacy.budget import RoundPlan, plan_round
from client.privacy.ledger import (
    LEDGER_VERSION,
    PLD_MAX_MECHANISMS,
    PLD_MAX_RDP_EPSILON,
    LedgerEntry,
    PrivacyLedger,
    Spend,
    pld_epsilon,
    rdp_epsilon,
)
from common.config import TrainConfig
from common.errors import ConfigError, DataError, PrivacyError
from common.privacy import PrivacySettings

DELTA = 1e-5


def _entry(run_id: int = 1, **changes: object) -> LedgerEntry:
    values: dict[str, object] = {
        "run_id": run_id,
        "server_round": 1,
        "noise_multiplier": 1.0,
        "sample_rate": 0.25,
        "steps": 4,
        "max_grad_norm": 1.0,
        "poisson": True,
        "num_examples": 64,
        "delta": DELTA,
        "epsilon_total": 1.0,
        "utc": "2026-01-01T00:00:00+00:00",
        **changes,
    }
    return LedgerEntry(**values)  # type: ignore[arg-type]


def _write(path: Path, *entries: dict[str, object], version: object = LEDGER_VERSION) -> None:
    path.write_text(json.dumps({"version": version, "entries": list(entries)}))


def _as_dict(entry: LedgerEntry) -> dict[str, object]:
    from dataclasses import asdict

    return asdict(entry)


# ---- the ledger file


@pytest.mark.parametrize(
    "changes", [{"sample_rate": 1.0}, {"steps": 0}, {"noise_multiplier": 1e-3}]
)
def test_a_ledger_entry_at_the_edge_of_valid_is_read(tmp_path: Path, changes: dict) -> None:
    path = tmp_path / "ledger.json"
    _write(path, _as_dict(_entry(**changes)))
    assert PrivacyLedger(path).entries() == [_entry(**changes)]


@pytest.mark.parametrize(
    "changes",
    [
        {"sample_rate": 0.0},
        {"sample_rate": 1.0001},
        {"noise_multiplier": 0.0},
        {"steps": -1},
        {"steps": 2.5},
    ],
)
def test_an_invalid_ledger_entry_refuses_to_train_naming_the_file(
    tmp_path: Path, changes: dict
) -> None:
    path = tmp_path / "ledger.json"
    _write(path, _as_dict(_entry()), _as_dict(_entry(**changes)))
    message = f"privacy ledger {path} is unreadable (invalid entry"
    with pytest.raises(PrivacyError, match=re.escape(message)):
        PrivacyLedger(path).entries()


def test_a_ledger_of_another_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    _write(path, version=LEDGER_VERSION + 1)
    message = (
        f"(version {LEDGER_VERSION + 1} != {LEDGER_VERSION}); refusing to train: restore it "
        "from a backup (deleting it would reset the site's privacy budget)"
    )
    with pytest.raises(PrivacyError, match=re.escape(message)):
        PrivacyLedger(path).entries()


def test_record_appends_to_the_entries_already_there(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    assert ledger.entries() == []
    ledger.record(_entry(1))
    ledger.record(_entry(2, steps=7))
    document = json.loads(ledger.path.read_text())
    assert document["version"] == LEDGER_VERSION
    assert ledger.entries() == [_entry(1), _entry(2, steps=7)]


def test_the_run_scope_counts_only_that_runs_entries(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    ledger.record(_entry(1, steps=3))
    ledger.record(_entry(2, steps=5))
    assert ledger.history(scope="run", run_id=2) == [(1.0, 0.25, 5)]
    assert ledger.history() == [(1.0, 0.25, 3), (1.0, 0.25, 5)]
    assert ledger.epsilon(DELTA, scope="run", run_id=2) == rdp_epsilon([(1.0, 0.25, 5)], DELTA)
    assert ledger.epsilon_pld(DELTA, scope="run", run_id=2) == pld_epsilon([(1.0, 0.25, 5)], DELTA)


def test_the_lock_is_exclusive_and_lives_beside_the_ledger(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "state" / "ledger.json")
    with ledger.locked():
        lock = tmp_path / "state" / "ledger.json.lock"
        with open(lock, "a") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_SH | fcntl.LOCK_NB)
    with open(lock, "a") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released on exit


# ---- the accountants


def test_a_single_step_counts() -> None:
    assert rdp_epsilon([(1.0, 0.25, 1)], DELTA) > 0
    assert rdp_epsilon([(1.0, 0.25, 1), (1.0, 0.25, 0)], DELTA) == rdp_epsilon(
        [(1.0, 0.25, 1)], DELTA
    )


def test_repeated_mechanisms_compose_like_one_longer_run() -> None:
    split = pld_epsilon([(1.0, 0.25, 5), (1.0, 0.25, 5), (1.0, 0.25, 0)], DELTA)
    assert split is not None and split == pld_epsilon([(1.0, 0.25, 10)], DELTA)
    assert pld_epsilon([(1.0, 0.25, 0)], DELTA) == 0.0


def test_pld_is_computed_for_up_to_the_mechanism_limit_not_counting_zero_steps() -> None:
    history = [(4.0 + i / 100, 0.01, 1) for i in range(PLD_MAX_MECHANISMS)]
    assert pld_epsilon([*history, (9.0, 0.01, 0)], DELTA) is not None
    assert pld_epsilon([*history, (9.0, 0.01, 1)], DELTA) is None


def test_pld_is_computed_up_to_the_rdp_limit_inclusive() -> None:
    history = [(1.0, 0.25, 4)]
    assert pld_epsilon(history, DELTA, rdp=PLD_MAX_RDP_EPSILON) is not None
    assert pld_epsilon(history, DELTA, rdp=PLD_MAX_RDP_EPSILON * 1.0001) is None
    assert pld_epsilon([(0.3, 1.0, 400)], DELTA) is None  # its own RDP epsilon is far above


# ---- a round's plan


def _plan(
    tmp_path: Path,
    privacy: PrivacySettings,
    *,
    n: int = 100,
    batch: int = 32,
    epochs: int = 3,
    planned: int = 2,
    run_id: int = 1,
) -> RoundPlan:
    return plan_round(
        privacy,
        ledger=PrivacyLedger(tmp_path / "ledger.json"),
        num_examples=n,
        config=TrainConfig(epochs=epochs, batch_size=batch),
        planned_rounds=planned,
        run_id=run_id,
    )


def test_sample_rate_and_steps_follow_the_batch_and_the_rows(tmp_path: Path) -> None:
    plan = _plan(tmp_path, PrivacySettings(noise_multiplier=1.0), n=100, batch=32, epochs=3)
    assert (plan.sample_rate, plan.steps, plan.expected_batch_size) == (0.32, 9, 32)
    assert plan.epsilon_round == pld_epsilon([(1.0, 0.32, 9)], DELTA)  # the default accountant
    assert plan.this_round.rdp == rdp_epsilon([(1.0, 0.32, 9)], DELTA)
    by_rdp = _plan(tmp_path, PrivacySettings(noise_multiplier=1.0, accountant="rdp"))
    assert by_rdp.epsilon_round == rdp_epsilon([(1.0, 0.32, 9)], DELTA)
    small = _plan(tmp_path, PrivacySettings(noise_multiplier=1.0), n=20, batch=32, epochs=2)
    assert (small.sample_rate, small.steps, small.expected_batch_size) == (1.0, 2, 20)


def test_one_row_and_one_planned_round_are_enough(tmp_path: Path) -> None:
    plan = _plan(tmp_path, PrivacySettings(noise_multiplier=1.0, delta=0.5), n=1, planned=1)
    assert (plan.sample_rate, plan.steps) == (1.0, 3) and not plan.declined
    with pytest.raises(DataError, match=r"^private training needs at least one labelled example$"):
        _plan(tmp_path, PrivacySettings(noise_multiplier=1.0), n=0)
    with pytest.raises(ConfigError, match="planned rounds must be >= 1, got 0"):
        _plan(tmp_path, PrivacySettings(noise_multiplier=1.0), planned=0)


def test_a_delta_of_exactly_one_over_n_is_refused(tmp_path: Path) -> None:
    message = (
        "dp-delta 0.01 is not below 1/n = 1/100: such a delta allows releasing an example "
        "outright; use a smaller dp-delta"
    )
    with pytest.raises(PrivacyError, match=f"^{re.escape(message)}$"):
        _plan(tmp_path, PrivacySettings(noise_multiplier=1.0, delta=0.01), n=100)
    assert not _plan(tmp_path, PrivacySettings(noise_multiplier=1.0, delta=0.0099), n=100).declined


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_a_budget_exactly_spent_by_the_round_is_allowed(tmp_path: Path, accountant: str) -> None:
    mechanism = [(1.0, 0.32, 9)]
    cost = pld_epsilon(mechanism, DELTA) if accountant == "pld" else rdp_epsilon(mechanism, DELTA)
    assert cost is not None
    settings = {"noise_multiplier": 1.0, "accountant": accountant}
    at = _plan(tmp_path, PrivacySettings(max_epsilon=cost, **settings))  # type: ignore[arg-type]
    assert not at.declined and at.epsilon_after == cost
    below = _plan(tmp_path, PrivacySettings(max_epsilon=cost * 0.999, **settings))  # type: ignore[arg-type]
    assert below.declined and below.reason == (
        f"privacy budget: this round would bring the site's epsilon from 0 to {cost:.4g} > "
        f"dp-max-epsilon {cost * 0.999:g} ({accountant.upper()}, delta {DELTA:g}, "
        "ledger scope 'site')"
    )


def test_the_run_scope_budget_ignores_other_runs_spend(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    ledger.record(_entry(1, noise_multiplier=1.0, sample_rate=0.32, steps=9))
    cost = pld_epsilon([(1.0, 0.32, 9)], DELTA)
    assert cost is not None
    run = PrivacySettings(noise_multiplier=1.0, max_epsilon=cost, ledger_scope="run")
    fresh = _plan(tmp_path, run, run_id=2)
    assert not fresh.declined and fresh.history == [] and fresh.epsilon_before == 0.0
    site = PrivacySettings(noise_multiplier=1.0, max_epsilon=cost)
    assert _plan(tmp_path, site, run_id=2).declined
    again = _plan(tmp_path, run, run_id=1)  # the run's own spend counts in its scope
    assert again.declined and again.history == [(1.0, 0.32, 9)]


def test_a_target_epsilon_counts_only_this_runs_spend(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    ledger.record(_entry(1, noise_multiplier=0.5, sample_rate=1.0, steps=50))  # a spent run
    plan = _plan(tmp_path, PrivacySettings(target_epsilon=2.0), n=32, batch=32, epochs=1, run_id=2)
    assert not plan.declined


def test_one_step_calibrates_and_the_round_after_the_planned_ones_is_declined(
    tmp_path: Path,
) -> None:
    privacy = PrivacySettings(target_epsilon=2.0)
    first = _plan(tmp_path, privacy, n=32, batch=32, epochs=1, planned=1)
    assert not first.declined and first.epsilon_after == pytest.approx(2.0, rel=0.02)
    assert first.steps == 1
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    ledger.record(_entry(1, noise_multiplier=first.noise_multiplier, sample_rate=1.0, steps=1))
    second = _plan(tmp_path, privacy, n=32, batch=32, epochs=1, planned=1)
    assert second.declined and second.reason.startswith("privacy target: this run would reach")
    assert f"{second.epsilon_after:.4g} (PLD) > dp-target-epsilon 2 (planned 1 rounds)" in (
        second.reason
    )


def test_the_calibrated_sigma_is_searched_once_per_target_and_plan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import opacus.accountants.utils as opacus_utils

    from client.privacy import budget

    searches: list[int] = []
    search = opacus_utils.get_noise_multiplier

    def counting(**kw: object) -> float:
        searches.append(int(kw["steps"]))  # type: ignore[call-overload]
        return float(search(**kw))  # type: ignore[arg-type]

    # PLD's search (the default accountant) tries sigmas on the planned steps, one entry of
    # steps x planned rounds (the plan's own costs are of 1-step rounds)
    trials: list[int] = []
    account = budget.account

    def counting_account(
        history: list[tuple[float, float, int]], delta: float, accountant: str
    ) -> Spend:
        if len(history) == 1 and history[0][2] > 1:
            trials.append(history[0][2])
        return account(history, delta, accountant)

    monkeypatch.setattr(budget, "_SIGMAS", {})
    monkeypatch.setattr(opacus_utils, "get_noise_multiplier", counting)
    monkeypatch.setattr(budget, "account", counting_account)
    privacy = PrivacySettings(target_epsilon=2.0)
    first = _plan(tmp_path, privacy, n=32, batch=32, epochs=1, planned=3)
    tried = len(trials)
    assert tried > 1 and set(trials) == {3}  # RDP's sigma, then the bisection below it
    again = _plan(
        tmp_path, PrivacySettings(target_epsilon=2.0), n=32, batch=32, epochs=1, planned=3
    )
    assert searches == [3] and again.noise_multiplier == first.noise_multiplier
    assert len(trials) == tried  # nothing searched again
    by_rdp = _plan(
        tmp_path,
        PrivacySettings(target_epsilon=2.0, accountant="rdp"),
        n=32,
        batch=32,
        epochs=1,
        planned=3,
    )
    assert searches == [3] and len(trials) == tried  # RDP's sigma was searched on the way
    assert first.noise_multiplier < by_rdp.noise_multiplier
    other = _plan(tmp_path, privacy, n=32, batch=32, epochs=1, planned=2)
    assert searches == [3, 2] and other.noise_multiplier < first.noise_multiplier


def test_a_target_epsilon_needs_a_training_step(tmp_path: Path) -> None:
    message = "privacy: dp-target-epsilon needs at least one training step per round"
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        _plan(tmp_path, PrivacySettings(target_epsilon=2.0), epochs=0)


def test_an_unreachable_target_epsilon_is_refused_naming_the_round(tmp_path: Path) -> None:
    message = "dp-target-epsilon 1e-06 is unreachable for 18 steps at sample rate 0.32 ("
    with pytest.raises(PrivacyError, match=f"^{re.escape(message)}.*train fewer rounds/epochs$"):
        _plan(tmp_path, PrivacySettings(target_epsilon=1e-6), planned=2)


def test_privacy_that_is_not_configured_is_refused(tmp_path: Path) -> None:
    unset = "privacy: DP is not configured (dp-noise-multiplier or dp-target-epsilon)"
    with pytest.raises(ConfigError, match=f"^{re.escape(unset)}$"):
        _plan(tmp_path, PrivacySettings())
    no_noise = (
        "training must be private (dp-max-epsilon is set) but neither dp-noise-multiplier nor "
        "dp-target-epsilon is configured: refusing to train without noise"
    )
    with pytest.raises(PrivacyError, match=f"^{re.escape(no_noise)}$"):
        _plan(tmp_path, PrivacySettings(max_epsilon=1.0))
