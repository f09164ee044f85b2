"""The communication benchmark on tiny encoders: a real Flower simulation, 2 sites, 1 round."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulations.benchmarks.comm import TARGET_RATIO, run_benchmark
from tests.tiny_config import tiny_encoders

pytestmark = pytest.mark.slow


def test_bench_comm_measures_head_sized_updates(
    tmp_path: Path, tiny_model_dirs: dict[str, Path]
) -> None:
    out = tmp_path / "results"
    result = run_benchmark(
        out_dir=out,
        work_dir=tmp_path / "work",
        presets=["small"],
        sites=2,
        rounds=1,
        run_config={**tiny_encoders(tiny_model_dirs), "dataset-n": 40, "batch-size": 16},
        deployment_preset=None,  # real SuperNodes add ~45 s; the committed benchmark measures them
    )
    written = json.loads((out / "bench_comm.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert {"machine", "frozen_encoders", "presets", "sites", "rounds"} <= set(written)
    assert {"cpus", "load_average_1_5_15_min", "python"} <= set(written["machine"])
    (row,) = written["presets"]
    head = row["reference"]["state_bytes"]
    # 32-d text and 24-d image inputs, small head (hidden 128, out 64): a few tens of kilobytes
    assert row["reference"]["parameters"] * 4 == head
    up, down = row["history_bytes_received"], row["history_bytes_sent"]
    assert up["count"] == down["count"] == 2  # 2 sites x 1 round, every one measured
    assert head <= up["min_bytes"] and up["max_ratio"] <= TARGET_RATIO and row["meets_target"]
    assert head <= down["min_bytes"] and down["max_ratio"] <= TARGET_RATIO
    assert row["site_audit_train_bytes"]["max_bytes"] == head  # raw arrays: exactly the head
    frozen = written["frozen_encoder_bytes"]
    assert frozen == sum(e["parameters"] * 4 for e in written["frozen_encoders"]) > head
    assert written["deployment_wire_traffic"] is None
    markdown = (out / "bench_comm.md").read_text()
    assert "| small |" in markdown and "meets" in markdown
