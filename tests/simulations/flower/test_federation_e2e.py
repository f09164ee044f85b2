"""End to end: the fedembed app on Flower's simulation engine, with client-level DP, then resumed.

The fedembed app on real SuperLink/SuperNode processes: tests/deploy/test_secure_deployment.py
(``deploy_local``), tests/deploy/test_secagg_deployment.py and tests/deploy/test_runbook.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.audit import verify_audit_log
from common.artifacts import load_head, state_arrays
from simulations.flower.federate import simulate
from tests.server.test_client_level_dp import DELTA, independent_epsilon
from tests.tiny_config import tiny_run_config

pytestmark = pytest.mark.slow

SIGMA, CLIP = 1.2, 1e-3


def _dp_run_config(tiny: dict[str, Path], **extra: Any) -> dict[str, Any]:
    """3 sites' worth of tiny data, client-side clipping to CLIP with noise multiplier SIGMA."""
    return tiny_run_config(
        tiny,
        **{
            "dataset-n": 90,
            "local-epochs": 1,
            "loss": "infonce",
            "num-server-rounds": 2,
            "client-dp": "client-side",
            "client-dp-noise-multiplier": SIGMA,
            "client-dp-clipping-norm": CLIP,
            "client-dp-delta": DELTA,
            **extra,
        },
    )


def _head_bytes(run_dir: Path) -> int:
    model, _ = load_head(run_dir / "final")
    return sum(a.nbytes for a in state_arrays(model).values())


def _assert_rdp_epsilon(history: list[dict[str, Any]]) -> None:
    """Every round released a noisy mean and reports the RDP epsilon of its releases so far."""
    for rounds, entry in enumerate(history, start=1):
        # all three updates passed the server's check at the clipping norm: the sites clipped them
        assert len(entry["sites"]) == 3 and not entry["rejected"] and not entry["failed"]
        record = entry["client_dp"]
        assert record["released"] and record["releases"] == rounds
        assert np.isfinite(record["epsilon"]) and record["delta"] == DELTA
        assert record["epsilon"] == pytest.approx(
            independent_epsilon(SIGMA, 3, 3, rounds, DELTA), rel=1e-9
        )


def test_simulation_three_sites_two_rounds_with_client_side_clipping_then_resume(
    tmp_path: Path, tiny_model_dirs: dict[str, Path]
) -> None:
    """Three virtual sites, two rounds: only the head travels, every round is checkpointed, sites
    clip their updates and the run reports the RDP epsilon (client-level DP, server/privacy.py); a
    coordinator restarted with resume=true continues from the last checkpoint with no lost or
    repeated rounds, and its epsilon charges the resumed run's earlier releases too."""
    fed = simulate(
        out_dir=tmp_path, sites=3, run_config=_dp_run_config(tiny_model_dirs), echo=False
    )
    assert fed.ok, fed.result.log_text[-3000:]
    assert [e["round"] for e in fed.history] == [1, 2]
    head_bytes = _head_bytes(fed.run_dir)
    for entry in fed.history:
        for received in entry["bytes_received"].values():
            assert head_bytes <= received <= 1.1 * head_bytes  # only the head travels
    _assert_rdp_epsilon(fed.history)
    assert "client-level DP: epsilon=" in fed.result.log_text
    assert sorted(p.name for p in (fed.run_dir / "checkpoints").iterdir()) == [
        "round-0000.safetensors",
        "round-0001.safetensors",
        "round-0002.safetensors",
    ]
    audit = tmp_path / "sites" / "site-0" / "audit.jsonl"
    assert verify_audit_log(audit).ok
    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    trained = [e for e in entries if e["message_type"] == "train"]
    assert [e["privacy"].get("client-dp-clipping-norm") for e in trained] == [CLIP, CLIP]

    # A coordinator restarted with resume=true continues from the last checkpoint: no lost or repeated rounds.
    resumed = simulate(
        out_dir=tmp_path,
        sites=3,
        run_config=_dp_run_config(tiny_model_dirs, **{"num-server-rounds": 3, "resume": True}),
        echo=False,
    )
    assert resumed.ok, resumed.result.log_text[-3000:]
    assert [e["round"] for e in resumed.history] == [1, 2, 3]
    assert "resuming run from round 2" in resumed.result.log_text
    _assert_rdp_epsilon(resumed.history)  # round 3: epsilon of 3 releases, not of 1
