"""End to end: the fedembed app on Flower's simulation engine and on real SuperLink/SuperNode processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.audit import verify_audit_log
from common.artifacts import load_head, state_arrays
from simulations.benchmarks.rounds import audit_timings, phase_breakdown
from simulations.flower.federate import deploy_local, simulate
from tests.tiny_config import tiny_run_config

pytestmark = pytest.mark.slow


def _tiny_run_config(tiny: dict[str, Path], **extra: Any) -> dict[str, Any]:
    return tiny_run_config(tiny, **{"num-server-rounds": 2, **extra})


def _head_bytes(run_dir: Path) -> int:
    model, _ = load_head(run_dir / "final")
    return sum(a.nbytes for a in state_arrays(model).values())


def test_simulation_three_sites_two_rounds_then_resume(
    tmp_path: Path, tiny_model_dirs: dict[str, Path]
) -> None:
    fed = simulate(
        out_dir=tmp_path, sites=3, run_config=_tiny_run_config(tiny_model_dirs), echo=False
    )
    assert fed.ok, fed.result.log_text[-3000:]
    assert [e["round"] for e in fed.history] == [1, 2]
    head_bytes = _head_bytes(fed.run_dir)
    for entry in fed.history:
        assert len(entry["sites"]) == 3 and not entry["rejected"] and not entry["failed"]
        for received in entry["bytes_received"].values():
            assert head_bytes <= received <= 1.1 * head_bytes  # only the head travels
    assert sorted(p.name for p in (fed.run_dir / "checkpoints").iterdir()) == [
        "round-0000.safetensors",
        "round-0001.safetensors",
        "round-0002.safetensors",
    ]
    # A coordinator restarted with resume=true continues from the last checkpoint: no lost or repeated rounds.
    resumed = simulate(
        out_dir=tmp_path,
        sites=3,
        run_config=_tiny_run_config(tiny_model_dirs, **{"num-server-rounds": 3, "resume": True}),
        echo=False,
    )
    assert resumed.ok, resumed.result.log_text[-3000:]
    assert [e["round"] for e in resumed.history] == [1, 2, 3]
    assert "resuming run from round 2" in resumed.result.log_text


def test_deployment_real_superlink_and_two_supernodes(
    tmp_path: Path, tiny_model_dirs: dict[str, Path]
) -> None:
    fed = deploy_local(
        out_dir=tmp_path, sites=2, run_config=_tiny_run_config(tiny_model_dirs), echo=False
    )
    assert fed.ok, fed.result.log_text[-3000:]
    assert [len(e["sites"]) for e in fed.history] == [2, 2]
    model, config = load_head(fed.final_head)
    shapes = {k: v.shape for k, v in state_arrays(model).items()}
    assert config["run"]["num_server_rounds"] == 2
    for site in ("site-0", "site-1"):
        summary = verify_audit_log(tmp_path / "sites" / site / "audit.jsonl", allowed_arrays=shapes)
        assert summary.ok, summary.violations
        assert summary.entries == 3  # two train replies and the final evaluate reply
    final = state_arrays(model)
    assert all(np.isfinite(v).all() for v in final.values())
    # Round timing: the sites' audit logs and the history line up into non-negative phases.
    phases = phase_breakdown(fed.history, audit_timings(tmp_path), skip_first=False)
    assert [p["round"] for p in phases] == [1, 2]
    for p in phases:
        assert all(p[k] >= 0 for k in ("delivery", "start-up", "handler", "return", "server"))
        assert p["handler"] >= p["training"] > 0 and p["wall"] <= fed.result.elapsed
