"""A site's sample-level epsilon, recomputed by a second library from the ledger's raw parameters.

The site accounts with both Opacus' RDP accountant and dp-accounting's PLD, and the one its
``dp-accountant`` names (PLD by default) governs ``dp-epsilon``. Here every number it reports is recomputed from the (sigma, q, steps) the ledger file records, read as raw JSON,
with dp-accounting's RdpAccountant and PLDAccountant (tests/dp_reference.py) and, for the PLD
number, also with Opacus' PRV accountant: three implementations that share no code with the path
that wrote the ledger. Across rounds of different lengths and mechanisms, and across a restart of
the site's process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from opacus.accountants import PRVAccountant

from client.app import app
from client.audit import audit_path
from client.privacy import (
    PrivacyLedger,
    PrivacySettings,
    PrivateRoundResult,
    ledger_path,
    pld_epsilon,
    rdp_epsilon,
    train_head_private,
)
from common.embedding import EmbeddedDataset
from common.flower import record_from_arrays
from common.heads import HeadConfig
from common.training import HeadModel, TrainConfig, build_head_model
from tests.client_site import in_process_node_config, load_client
from tests.dp_reference import ledger_entries, reference_epsilon
from tests.flower_messages import message_metadata
from tests.tiny_config import tiny_run_config

DELTA = 1e-5
ROOT = Path(__file__).resolve().parents[2]
# Opacus and dp-accounting evaluate the subsampled Gaussian's RDP at fractional orders by different
# series; on these histories they agree within 0.1% (integer orders: exactly).
RDP_REL = 2e-3
# The site's PLD (entries of one mechanism merged) and the reference's (one event per entry).
PLD_REL = 1e-6
# Opacus' PRV accountant reports an upper bound at most eps_error (0.01) above its estimate.
PRV_MARGIN = 0.02


@pytest.fixture(autouse=True)
def _quiet_one_thread() -> Iterator[None]:
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        warnings.filterwarnings("ignore", message="Optimal order is the")
        yield


def _data(n: int, *, classes: int = 4, seed: int = 0) -> EmbeddedDataset:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centers = rng.normal(size=(classes, 12))
    return EmbeddedDataset(
        ids=[str(i) for i in range(n)],
        image=(2 * centers[labels] + rng.normal(size=(n, 12))).astype(np.float32),
        text=(2 * centers[labels][:, :8] + rng.normal(size=(n, 8))).astype(np.float32),
        labels=labels,
        class_names=[f"c{i}" for i in range(classes)],
        classes_declared=True,
    )


def _model() -> HeadModel:
    return build_head_model(
        dims={"image": 12, "text": 8},
        head_config=HeadConfig(out_dim=8, hidden_dim=16),
        layout="two-tower",
        loss="proxy",
        num_classes=4,
        seed=0,
    )


def site_round(
    ledger: Path, *, n: int, sigma: float, batch: int, epochs: int, server_round: int
) -> PrivateRoundResult:
    """One private round of a site with ``n`` rows, as client/training.py runs it."""
    return train_head_private(
        _model(),
        _data(n),
        TrainConfig(loss="proxy", epochs=epochs, batch_size=batch, lr=5e-3),
        PrivacySettings(noise_multiplier=sigma, delta=DELTA),
        ledger_path=ledger,
        planned_rounds=3,
        run_id=1,
        server_round=server_round,
    )


def _raw(entries: list[dict[str, Any]]) -> list[tuple[float, float, int]]:
    return [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries]


def _assert_reported_equals_reference(
    reported_rdp: float | None, reported_pld: float | None, entries: list[dict[str, Any]]
) -> None:
    reference = reference_epsilon(entries, DELTA)
    assert reported_rdp is not None
    assert reported_rdp == pytest.approx(reference.rdp, rel=RDP_REL)
    assert reported_pld is not None
    assert reported_pld == pytest.approx(reference.pld, rel=PLD_REL)
    assert reference.pld < 0.95 * reference.rdp  # PLD is the tighter bound
    assert entries[-1]["epsilon_total"] == reported_rdp
    assert entries[-1]["epsilon_total_pld"] == reported_pld


def test_epsilon_across_rounds_equals_dp_accounting_on_the_raw_ledger(tmp_path: Path) -> None:
    ledger = tmp_path / "state" / "privacy-ledger.json"
    n = 256
    # rounds of different lengths and mechanisms: (sigma, batch, epochs) -> (sigma, q, steps)
    plans = [(1.1, 32, 1), (1.1, 32, 2), (1.6, 64, 1)]
    expected = [(1.1, 32 / n, 8), (1.1, 32 / n, 16), (1.6, 64 / n, 4)]
    for k, (sigma, batch, epochs) in enumerate(plans, start=1):
        result = site_round(ledger, n=n, sigma=sigma, batch=batch, epochs=epochs, server_round=k)
        entries = ledger_entries(ledger)
        assert _raw(entries) == expected[:k]  # the ledger records what the round ran
        assert result.steps == entries[-1]["steps"]
        _assert_reported_equals_reference(
            result.epsilon_total_rdp, result.epsilon_total_pld, entries
        )
        this_round = reference_epsilon(entries[-1:], DELTA)
        assert result.epsilon_round == pytest.approx(this_round.pld, rel=PLD_REL)  # PLD governs
        assert result.epsilon_total == result.epsilon_total_pld
        metrics = result.metrics()  # the reply to the server: both accountants' totals
        assert metrics["dp-epsilon"] == metrics["dp-epsilon-pld"] == result.epsilon_total_pld
        assert metrics["dp-epsilon-rdp"] == result.epsilon_total_rdp
        assert result.audit_record() == {**metrics, "dp-accountant": "pld"}  # and the audit log

    _assert_prv_agrees(result.epsilon_total_pld, ledger_entries(ledger))
    assert PrivacyLedger(ledger).epsilon_pld(DELTA) == result.epsilon_total_pld


def _assert_prv_agrees(reported_pld: float | None, entries: list[dict[str, Any]]) -> None:
    """A third implementation, Opacus' PRV accountant, on the raw entries: the same epsilon."""
    prv = PRVAccountant()
    prv.history = _raw(entries)
    assert reported_pld is not None
    assert 0.0 <= float(prv.get_epsilon(DELTA)) - reported_pld <= PRV_MARGIN


_CHILD = """
import json, sys, warnings
warnings.simplefilter("ignore")
from pathlib import Path
from tests.client.test_dp_accounting import site_round
result = site_round(Path(sys.argv[1]), n=128, sigma=1.2, batch=32, epochs=2, server_round=2)
print(json.dumps({"rdp": result.epsilon_total_rdp, "pld": result.epsilon_total_pld}))
"""


@pytest.mark.slow  # a second Python process (torch, Opacus imports): ~10 s
def test_epsilon_keeps_accumulating_across_a_process_restart(tmp_path: Path) -> None:
    ledger = tmp_path / "privacy-ledger.json"
    first = site_round(ledger, n=128, sigma=1.2, batch=32, epochs=1, server_round=1)
    reader = PrivacyLedger(ledger)
    assert len(reader.entries()) == 1

    # round 2 in a new process (a restarted site): it reads the file and adds to it
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(ledger)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
        check=False,
    )
    assert child.returncode == 0, child.stderr[-2000:]
    second = json.loads(child.stdout.strip().splitlines()[-1])
    entries = ledger_entries(ledger)
    assert _raw(entries) == [(1.2, 0.25, 4), (1.2, 0.25, 8)]
    _assert_reported_equals_reference(second["rdp"], second["pld"], entries)
    assert second["pld"] > first.epsilon_total
    assert len(reader.entries()) == 2  # the same reader object sees the other process's spend

    third = site_round(ledger, n=128, sigma=1.2, batch=32, epochs=1, server_round=3)
    entries = ledger_entries(ledger)
    assert [e["server_round"] for e in entries] == [1, 2, 3]
    _assert_reported_equals_reference(third.epsilon_total_rdp, third.epsilon_total_pld, entries)
    _assert_prv_agrees(third.epsilon_total_pld, entries)
    # one mechanism run 16 steps in three processes costs what 16 steps in one would
    assert third.epsilon_total == pytest.approx(
        reference_epsilon([{**entries[0], "steps": 16}], DELTA).pld, rel=PLD_REL
    )


def test_pld_is_reported_only_where_meaningful_and_old_ledgers_still_load(
    tmp_path: Path,
) -> None:
    assert pld_epsilon([], DELTA) == 0.0
    assert pld_epsilon([(1.0, 0.1, 0)], DELTA) == 0.0
    # sigma ~ 0: epsilon is astronomical (no guarantee): not worth the PLD's unbounded support
    assert pld_epsilon([(1e-6, 0.25, 4)], DELTA) is None
    many = [(1.0 + k / 100, 0.01, 1) for k in range(40)]
    assert pld_epsilon(many, DELTA) is None  # too many distinct mechanisms to compose cheaply
    # very many tiny steps: the coarse discretization's rounding adds up; the fine one is tighter
    long = [(2.0, 0.001, 100_000)]
    long_pld = pld_epsilon(long, DELTA)
    assert long_pld is not None and long_pld < 0.95 * rdp_epsilon(long, DELTA)
    # entries of the same mechanism merge: one composition of 10 steps
    split = pld_epsilon([(1.0, 0.1, 4), (1.0, 0.1, 6)], DELTA)
    assert split == pld_epsilon([(1.0, 0.1, 10)], DELTA)

    # a ledger written before PLD was recorded: it loads, and the next round adds to it
    ledger = tmp_path / "privacy-ledger.json"
    site_round(ledger, n=128, sigma=1.2, batch=32, epochs=1, server_round=1)
    document = json.loads(ledger.read_text())
    del document["entries"][0]["epsilon_total_pld"]
    ledger.write_text(json.dumps(document))
    assert PrivacyLedger(ledger).entries()[0].epsilon_total_pld is None
    result = site_round(ledger, n=128, sigma=1.2, batch=32, epochs=1, server_round=2)
    _assert_reported_equals_reference(
        result.epsilon_total_rdp, result.epsilon_total_pld, ledger_entries(ledger)
    )


def test_the_sites_reply_and_audit_log_carry_both_epsilons(
    tmp_path: Path, tiny_model_dirs: dict[str, Path]
) -> None:
    """Through the ClientApp (client/training.py): the reply's dp-epsilon is PLD's (the default
    dp-accountant), it and the audit log carry RDP's and PLD's totals, and both equal
    dp-accounting's recomputation from the ledger."""
    run_config = tiny_run_config(
        tiny_model_dirs,
        **{"dataset-n": 80, "loss": "proxy", "dp-noise-multiplier": 1.1, "dp-delta": DELTA},
    )
    context, _, initial = load_client(run_config, in_process_node_config(tmp_path))
    for server_round in (1, 2):
        content = RecordDict(
            {
                "arrays": record_from_arrays(initial),
                "config": ConfigRecord({"server-round": server_round}),
            }
        )
        message = Message(  # type: ignore[call-overload]
            metadata=message_metadata(dst_node_id=0, message_type="train"), content=content
        )
        reply = app(message, context)
        assert not reply.has_error(), reply.error if reply.has_error() else None
    state = tmp_path / "state"
    entries = ledger_entries(ledger_path(state))
    assert [e["server_round"] for e in entries] == [1, 2]
    reference = reference_epsilon(entries, DELTA)
    metrics = dict(reply.content.metric_records["metrics"])
    assert metrics["dp-epsilon"] == metrics["dp-epsilon-pld"] == entries[-1]["epsilon_total_pld"]
    assert metrics["dp-epsilon-pld"] == pytest.approx(reference.pld, rel=PLD_REL)
    assert metrics["dp-epsilon-rdp"] == entries[-1]["epsilon_total"]
    assert metrics["dp-epsilon-rdp"] == pytest.approx(reference.rdp, rel=RDP_REL)
    assert entries[-1]["epsilon_total_pld"] < entries[-1]["epsilon_total"]  # PLD is tighter
    audit = [json.loads(line) for line in audit_path(state).read_text().splitlines()]
    assert len(audit) == 2
    sent = {k: v for k, v in metrics.items() if k.startswith("dp-")}
    assert audit[-1]["privacy"] == {**sent, "dp-accountant": "pld"}
    assert entries[-1]["accountant"] == "pld"
