"""``dp-accountant``: the accountant that calibrates sigma, decides the budget and gives the reported
``dp-epsilon`` (PLD by default, RDP on request), the other's total reported beside it.

The issue's example (issue 16, "Tighter accounting"): a site of 100 rows, batch 24 (q = 0.24), 5
epochs of 4 steps (20 steps a round), 3 rounds, delta 1e-5, dp-target-epsilon 3. Every number the
site reports is recomputed here from the ledger file's raw (sigma, q, steps), read as JSON, with
dp-accounting's PLDAccountant and RdpAccountant called directly (no code of client/privacy).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from opacus.accountants.utils import get_noise_multiplier

from client.privacy import (
    PrivacyLedger,
    PrivacySettings,
    PrivateRoundResult,
    train_head_private,
)
from client.privacy import ledger as ledger_module
from client.privacy.budget import SIGMA_TOLERANCE, RoundPlan, plan_round
from client.privacy.ledger import (
    PLD_MAX_MECHANISMS,
    LedgerEntry,
    account,
    pld_epsilon,
    rdp_epsilon,
)
from common.errors import ConfigError, PrivacyError
from common.heads import HeadConfig
from common.training import HeadModel, TrainConfig, build_head_model
from tests.embedded_data import clustered

DELTA = 1e-5
N, BATCH, EPOCHS, ROUNDS, TARGET = 100, 24, 5, 3, 3.0
Q, STEPS = BATCH / N, EPOCHS * (N // BATCH)  # 0.24, 20 a round
# The site merges entries of one (sigma, q) into one composition; the reference composes each
# ledger entry on its own: the same PLD up to float rounding of the FFT convolutions.
PLD_REL = 1e-9
# Opacus and dp-accounting evaluate the subsampled Gaussian's RDP by different series (< 0.1%).
RDP_REL = 2e-3


def _model() -> HeadModel:
    return build_head_model(
        dims={"image": 12, "text": 8},
        head_config=HeadConfig(out_dim=8, hidden_dim=16),
        layout="two-tower",
        loss="proxy",
        num_classes=4,
        seed=0,
    )


def _round(
    ledger: Path, privacy: PrivacySettings, *, server_round: int, n: int = N, run_id: int = 1
) -> PrivateRoundResult:
    return train_head_private(
        _model(),
        clustered(n),
        TrainConfig(loss="proxy", epochs=EPOCHS, batch_size=BATCH, lr=5e-3),
        privacy,
        ledger_path=ledger,
        planned_rounds=ROUNDS,
        run_id=run_id,
        server_round=server_round,
    )


def _event(entries: list[dict[str, Any]]) -> dp_accounting.DpEvent:
    return dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(
                    float(e["sample_rate"]), dp_accounting.GaussianDpEvent(e["noise_multiplier"])
                ),
                int(e["steps"]),
            )
            for e in entries
        ]
    )


def _reference_pld(entries: list[dict[str, Any]]) -> float:
    """dp-accounting's PLD (pessimistic, the site's first discretization) of the raw entries."""
    accountant = PLDAccountant(value_discretization_interval=1e-3)
    accountant.compose(_event(entries))
    return float(accountant.get_epsilon(DELTA))


def _reference_rdp(entries: list[dict[str, Any]]) -> float:
    accountant = RdpAccountant()
    accountant.compose(_event(entries))
    return float(accountant.get_epsilon(DELTA))


def _raw(path: Path) -> list[dict[str, Any]]:
    entries = json.loads(path.read_text(encoding="utf-8"))["entries"]
    assert isinstance(entries, list)
    return entries


# ---- the issue's example


def test_the_issue_example_same_noise_costs_less_by_pld() -> None:
    """3 rounds at the noise RDP calibrates for epsilon 3: RDP says 3.00, PLD 2.74."""
    sigma = float(
        get_noise_multiplier(
            target_epsilon=TARGET, target_delta=DELTA, sample_rate=Q, steps=ROUNDS * STEPS
        )
    )
    history = [(sigma, Q, STEPS)] * ROUNDS
    pld, rdp = account(history, DELTA, "pld"), account(history, DELTA, "rdp")
    assert pld.rdp == rdp.rdp and pld.pld == rdp.pld  # both accountants, whichever governs
    assert (pld.accountant, rdp.accountant) == ("pld", "rdp")
    assert rdp.epsilon == pytest.approx(3.00, abs=0.01)
    assert pld.epsilon == pytest.approx(2.74, abs=0.01)
    entries = [{"noise_multiplier": sigma, "sample_rate": Q, "steps": STEPS}] * ROUNDS
    assert pld.epsilon == pytest.approx(_reference_pld(entries), rel=PLD_REL)
    assert rdp.epsilon == pytest.approx(_reference_rdp(entries), rel=RDP_REL)


def test_pld_calibration_reaches_the_target_with_less_noise(tmp_path: Path) -> None:
    plans = {
        name: plan_round(
            PrivacySettings(target_epsilon=TARGET, accountant=name),
            ledger=PrivacyLedger(tmp_path / f"{name}.json"),
            num_examples=N,
            config=TrainConfig(epochs=EPOCHS, batch_size=BATCH),
            planned_rounds=ROUNDS,
            run_id=1,
        )
        for name in ("pld", "rdp")
    }
    assert all((p.sample_rate, p.steps) == (Q, STEPS) for p in plans.values())
    sigma_pld, sigma_rdp = plans["pld"].noise_multiplier, plans["rdp"].noise_multiplier
    assert sigma_pld < 0.95 * sigma_rdp  # ~7% less noise for the same guarantee
    # the planned rounds by dp-accounting directly: within the search's tolerance of the target
    planned = [{"noise_multiplier": sigma_pld, "sample_rate": Q, "steps": ROUNDS * STEPS}]
    assert TARGET - SIGMA_TOLERANCE <= _reference_pld(planned) <= TARGET
    assert _reference_rdp(planned) > TARGET  # RDP would call the same noise over budget
    # rdp keeps today's sigma: Opacus' own search, unchanged
    assert sigma_rdp == get_noise_multiplier(
        target_epsilon=TARGET, target_delta=DELTA, sample_rate=Q, steps=ROUNDS * STEPS
    )


def test_three_pld_rounds_report_what_dp_accounting_computes_from_the_raw_ledger(
    tmp_path: Path,
) -> None:
    ledger = tmp_path / "state" / "privacy-ledger.json"
    privacy = PrivacySettings.from_config({"dp-target-epsilon": TARGET, "dp-delta": DELTA})
    assert privacy.accountant == "pld"  # the default
    for k in range(1, ROUNDS + 1):
        result = _round(ledger, privacy, server_round=k)
        entries = _raw(ledger)
        assert [(e["sample_rate"], e["steps"]) for e in entries] == [(Q, STEPS)] * k
        reference = _reference_pld(entries)
        metrics, record = result.metrics(), result.audit_record()
        assert result.accountant == "pld" and not result.accountant_note
        assert metrics["dp-epsilon"] == metrics["dp-epsilon-pld"] == result.epsilon_total
        assert metrics["dp-epsilon"] == pytest.approx(reference, rel=PLD_REL)
        assert metrics["dp-epsilon-rdp"] == pytest.approx(_reference_rdp(entries), rel=RDP_REL)
        assert metrics["dp-epsilon-pld"] < metrics["dp-epsilon-rdp"]
        assert metrics["dp-epsilon-round"] == pytest.approx(_reference_pld(entries[-1:]), PLD_REL)
        assert record == {**metrics, "dp-accountant": "pld"}
        # the ledger keeps RDP's total in epsilon_total, PLD's beside it, and who governed
        assert entries[-1]["epsilon_total"] == metrics["dp-epsilon-rdp"]
        assert entries[-1]["epsilon_total_pld"] == metrics["dp-epsilon-pld"]
        assert entries[-1]["accountant"] == "pld" and entries[-1]["accountant_note"] == ""
    assert TARGET - SIGMA_TOLERANCE <= result.epsilon_total <= TARGET  # the target, reached
    assert {e["noise_multiplier"] for e in entries} == {result.noise_multiplier}

    # the file reloaded (a restarted site) and rewritten: the same total from its raw entries
    copy = tmp_path / "copy.json"
    copy.write_text(json.dumps(json.loads(ledger.read_text())), encoding="utf-8")
    reloaded = PrivacyLedger(copy).spend(DELTA, "pld")
    assert reloaded.epsilon == result.epsilon_total == reloaded.pld
    assert reloaded.rdp == result.epsilon_total_rdp
    assert reloaded.epsilon == pytest.approx(_reference_pld(_raw(copy)), rel=PLD_REL)

    extra = _round(ledger, privacy, server_round=ROUNDS + 1)  # beyond the planned rounds
    assert extra.declined and len(_raw(ledger)) == ROUNDS
    assert re.search(
        r"this run would reach epsilon [\d.]+ \(PLD\) > dp-target-epsilon 3 ", extra.reason
    )
    assert extra.epsilon_total == result.epsilon_total and extra.epsilon_round == 0.0


# ---- the budget decisions


def _plan(tmp_path: Path, privacy: PrivacySettings, *, run_id: int = 1) -> RoundPlan:
    return plan_round(
        privacy,
        ledger=PrivacyLedger(tmp_path / "ledger.json"),
        num_examples=N,
        config=TrainConfig(epochs=EPOCHS, batch_size=BATCH),
        planned_rounds=ROUNDS,
        run_id=run_id,
    )


def test_the_site_budget_is_decided_by_the_chosen_accountant(tmp_path: Path) -> None:
    mechanism = [(1.0, Q, STEPS)]
    pld, rdp = pld_epsilon(mechanism, DELTA), rdp_epsilon(mechanism, DELTA)
    assert pld is not None and pld < 0.95 * rdp
    budget_between = (pld + rdp) / 2
    by_pld = _plan(tmp_path, PrivacySettings(noise_multiplier=1.0, max_epsilon=budget_between))
    assert not by_pld.declined and by_pld.epsilon_after == pld
    assert (by_pld.after.rdp, by_pld.after.accountant) == (rdp, "pld")
    by_rdp = _plan(
        tmp_path,
        PrivacySettings(noise_multiplier=1.0, max_epsilon=budget_between, accountant="rdp"),
    )
    assert by_rdp.declined and by_rdp.epsilon_after == rdp and by_rdp.after.pld == pld
    assert by_rdp.reason == (
        f"privacy budget: this round would bring the site's epsilon from 0 to {rdp:.4g} > "
        f"dp-max-epsilon {budget_between:g} (RDP, delta {DELTA:g}, ledger scope 'site')"
    )
    tight = _plan(tmp_path, PrivacySettings(noise_multiplier=1.0, max_epsilon=0.99 * pld))
    assert tight.declined and "(PLD, delta" in tight.reason


def test_the_run_target_is_decided_by_the_chosen_accountant(tmp_path: Path) -> None:
    """Two earlier rounds of this run at sigma 2.9, between the sigmas PLD (2.81) and RDP (3.03)
    calibrate for the target: the third round, at each one's own sigma, still fits it by PLD and
    no longer by RDP."""
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    for k in (1, 2):
        ledger.record(_entry(server_round=k, noise_multiplier=2.9, steps=STEPS))
    by_pld = _plan(tmp_path, PrivacySettings(target_epsilon=TARGET))
    by_rdp = _plan(tmp_path, PrivacySettings(target_epsilon=TARGET, accountant="rdp"))
    assert not by_pld.declined and by_pld.epsilon_after <= TARGET
    assert by_pld.after.rdp > TARGET  # RDP would have declined this very round
    assert by_rdp.declined and by_rdp.reason.startswith(
        f"privacy target: this run would reach epsilon {by_rdp.epsilon_after:.4g} (RDP) > "
        "dp-target-epsilon 3 (planned 3 rounds)"
    )


def _entry(**changes: Any) -> LedgerEntry:
    values: dict[str, Any] = {
        "run_id": 1,
        "server_round": 1,
        "noise_multiplier": 1.0,
        "sample_rate": Q,
        "steps": STEPS,
        "max_grad_norm": 1.0,
        "poisson": True,
        "num_examples": N,
        "delta": DELTA,
        "epsilon_total": 1.0,
        "utc": "2026-01-01T00:00:00+00:00",
        **changes,
    }
    return LedgerEntry(**values)


# ---- rdp keeps today's numbers


def test_rdp_keeps_todays_numbers_and_reports_pld_beside_them(tmp_path: Path) -> None:
    from opacus.accountants import RDPAccountant

    ledger = tmp_path / "privacy-ledger.json"
    privacy = PrivacySettings(noise_multiplier=1.1, accountant="rdp")
    for k in (1, 2):
        result = _round(ledger, privacy, server_round=k)
        opacus = RDPAccountant()
        opacus.history = [(1.1, Q, k * STEPS)]
        assert result.epsilon_total == pytest.approx(opacus.get_epsilon(DELTA), rel=1e-9)
        metrics = result.metrics()
        assert metrics["dp-epsilon"] == metrics["dp-epsilon-rdp"] == result.epsilon_total
        assert metrics["dp-epsilon-pld"] == pytest.approx(_reference_pld(_raw(ledger)), PLD_REL)
        assert metrics["dp-epsilon-pld"] < metrics["dp-epsilon"]
        assert result.audit_record()["dp-accountant"] == "rdp"
        assert _raw(ledger)[-1]["accountant"] == "rdp"
        assert _raw(ledger)[-1]["epsilon_total"] == result.epsilon_total


# ---- where PLD does not govern: RDP's number, and the record says why


def test_where_pld_is_not_computed_rdp_governs_and_the_record_says_so(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "state" / "privacy-ledger.json")
    for k in range(PLD_MAX_MECHANISMS + 1):  # more distinct mechanisms than PLD composes
        ledger.record(_entry(server_round=k, noise_multiplier=4.0 + k / 100, steps=1))
    result = _round(ledger.path, PrivacySettings(noise_multiplier=3.0), server_round=99, n=32)
    metrics, record = result.metrics(), result.audit_record()
    assert "dp-epsilon-pld" not in metrics  # no number that is not a computed guarantee
    assert metrics["dp-epsilon"] == metrics["dp-epsilon-rdp"] == result.epsilon_total
    assert metrics["dp-epsilon"] == pytest.approx(_reference_rdp(_raw(ledger.path)), RDP_REL)
    note = (
        f"PLD not computed ({PLD_MAX_MECHANISMS + 2} distinct (sigma, q) mechanisms > "
        f"PLD_MAX_MECHANISMS {PLD_MAX_MECHANISMS}): RDP's epsilon governs"
    )
    assert record["dp-accountant"] == "rdp" and record["dp-accountant-note"] == note
    last = _raw(ledger.path)[-1]
    assert (last["accountant"], last["accountant_note"], last["epsilon_total_pld"]) == (
        "rdp",
        note,
        None,
    )
    # an RDP epsilon beyond PLD_MAX_RDP_EPSILON: no PLD either
    huge = account([(0.3, 1.0, 400)], DELTA, "pld")
    assert huge.accountant == "rdp" and huge.pld is None and huge.epsilon == huge.rdp
    assert (
        huge.note.startswith("PLD not computed (RDP epsilon ")
        and "> PLD_MAX_RDP_EPSILON 64" in huge.note
    )


def test_a_pld_estimate_above_rdp_does_not_govern(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both are upper bounds: the smaller holds. A very coarse PLD grid rounds far upwards."""
    history = [(3.0, Q, 60)]
    fine = account(history, DELTA, "pld")
    assert fine.accountant == "pld" and fine.pld is not None and fine.pld < fine.rdp
    monkeypatch.setattr(ledger_module, "PLD_DISCRETIZATIONS", (0.5,))
    coarse = account(history, DELTA, "pld")
    assert coarse.pld is not None and coarse.pld > coarse.rdp
    assert (coarse.accountant, coarse.epsilon) == ("rdp", coarse.rdp)
    assert coarse.note == "PLD's estimate is not below RDP's: RDP's epsilon governs"


def test_account_needs_a_known_accountant() -> None:
    with pytest.raises(ValueError, match=r"accountant must be one of \['pld', 'rdp'\], got 'prv'"):
        account([(1.0, Q, 1)], DELTA, "prv")
    empty = account([], DELTA, "pld")
    assert (empty.epsilon, empty.rdp, empty.pld, empty.accountant) == (0.0, 0.0, 0.0, "pld")


# ---- the ledger and the setting


def test_a_ledger_written_before_the_accountant_setting_loads_and_keeps_counting(
    tmp_path: Path,
) -> None:
    path = tmp_path / "privacy-ledger.json"
    old = {  # an entry as the ledger wrote it before PLD was recorded at all
        "run_id": 1,
        "server_round": 1,
        "noise_multiplier": 1.1,
        "sample_rate": Q,
        "steps": STEPS,
        "max_grad_norm": 1.0,
        "poisson": True,
        "num_examples": N,
        "delta": DELTA,
        "epsilon_total": rdp_epsilon([(1.1, Q, STEPS)], DELTA),
        "utc": "2026-01-01T00:00:00+00:00",
    }
    path.write_text(json.dumps({"version": 1, "entries": [old]}), encoding="utf-8")
    (entry,) = PrivacyLedger(path).entries()
    assert (entry.accountant, entry.accountant_note, entry.epsilon_total_pld) == ("rdp", "", None)
    result = _round(path, PrivacySettings(noise_multiplier=1.1), server_round=2)
    entries = _raw(path)
    assert result.epsilon_total == pytest.approx(_reference_pld(entries), rel=PLD_REL)
    # the old entry is rewritten as it was, marked as decided by RDP (as it was)
    assert entries[0] == {
        **old,
        "epsilon_total_pld": None,
        "accountant": "rdp",
        "accountant_note": "",
    }
    assert entries[1]["accountant"] == "pld"


def test_a_ledger_entry_naming_an_unknown_accountant_is_refused(tmp_path: Path) -> None:
    from dataclasses import asdict

    path = tmp_path / "ledger.json"
    path.write_text(json.dumps({"version": 1, "entries": [asdict(_entry(accountant="prv"))]}))
    with pytest.raises(PrivacyError, match=re.escape(f"privacy ledger {path} is unreadable")):
        PrivacyLedger(path).entries()


def test_dp_accountant_is_parsed_like_every_dp_key_and_the_node_wins() -> None:
    assert PrivacySettings().accountant == "pld"
    assert PrivacySettings.from_config({"dp-accountant": "rdp"}).accountant == "rdp"
    assert PrivacySettings.from_config({"dp-accountant": ""}).accountant == "pld"  # unset
    with pytest.raises(
        ConfigError, match=r"dp-accountant must be one of \['pld', 'rdp'\], got 'prv'"
    ):
        PrivacySettings.from_config({"dp-accountant": "prv"})
    merged = PrivacySettings.merge({"dp-accountant": "pld"}, {"dp-accountant": "rdp"})
    assert merged.accountant == "rdp"
    assert PrivacySettings.merge({"dp-accountant": "rdp"}, {}).accountant == "rdp"
    assert merged.to_config()["dp-accountant"] == "rdp"
    assert PrivacySettings.from_config(merged.to_config()) == merged
    assert "dp-accountant" not in merged.request_keys()  # it does not make training private
