"""A poisoned site against FedMedian and a site over its privacy budget, with real Flower processes
on 127.0.0.1: the run completes and says who did what."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from client.audit import audit_path
from common.tensorfile import read_tensorfile
from simulations.flower.flwr_cli import run_app
from simulations.flower.run_config import ConfigValue
from tests.deploy.faults import (
    RUN_TIMEOUT,
    fault_config,
    federation,
    read_history,
    setup_home,
)

pytestmark = pytest.mark.slow


def test_fedmedian_keeps_the_head_near_the_honest_sites_despite_a_poisoned_one(
    tmp_path: Path,
    tiny_model_dirs: dict[str, Path],
    fault_app: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run_dir = setup_home(monkeypatch, tmp_path)
    dumps = tmp_path / "honest-updates"
    dumps.mkdir()
    extra: dict[int, dict[str, ConfigValue]] = {i: {"fault-dump-dir": str(dumps)} for i in range(3)}
    extra[2]["fault"] = "poison"
    with federation(tmp_path, 3, extra=extra) as (link, _):
        config = fault_config(
            tiny_model_dirs,
            run_dir,
            {
                "num-server-rounds": 1,
                "strategy": "fedmedian",
                "min-sites": 3,
                "max-update-norm": 1e6,  # the poison passes validation: only robustness can help
                "report-eval": False,
            },
        )
        result = run_app(fault_app, link.connection, run_config=config, timeout=RUN_TIMEOUT)
    assert result.ok, result.log_text[-3000:]
    assert read_history(run_dir)[0]["outcomes"] == dict.fromkeys(
        ("site-0", "site-1", "site-2"), "aggregated"
    )
    honest = [dict(np.load(dumps / f"site-{i}-round1.npz")) for i in range(3)]
    head, _ = read_tensorfile(run_dir / "checkpoints" / "round-0001.safetensors", key="meta")
    offset = 5.0  # fault_clientapp.POISON_OFFSET
    for name, value in head.items():
        stack = np.stack([h[name] for h in honest])
        sent = stack.copy()
        sent[2] += offset
        # Flower's FedMedian really ran on what the sites sent ...
        np.testing.assert_allclose(value, np.median(sent, axis=0), rtol=1e-5, atol=1e-6)
        # ... and it stays within the honest updates' spread, far from the mean's offset / 3.
        honest_mean = stack.mean(axis=0)
        assert np.abs(value - honest_mean).max() <= np.ptp(stack, axis=0).max() + 1e-6
        assert np.abs(value - honest_mean).max() < 0.05 * offset / 3


def test_site_over_its_privacy_budget_declines_and_the_run_completes(
    tmp_path: Path,
    tiny_model_dirs: dict[str, Path],
    fault_app: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run_dir = setup_home(monkeypatch, tmp_path)
    budget: dict[str, ConfigValue] = {"dp-noise-multiplier": 1.0, "dp-max-epsilon": 0.001}
    with federation(tmp_path, 3, extra={2: budget}) as (link, _):
        config = fault_config(tiny_model_dirs, run_dir, {"num-server-rounds": 2, "loss": "proxy"})
        result = run_app(fault_app, link.connection, run_config=config, timeout=RUN_TIMEOUT)
    assert result.ok, result.log_text[-3000:]
    history = read_history(run_dir)
    assert [e["round"] for e in history] == [1, 2]
    for entry in history:
        assert entry["outcomes"]["site-0"] == entry["outcomes"]["site-1"] == "aggregated"
        assert entry["outcomes"]["site-2"].startswith("declined: site declined")
        assert "dp-max-epsilon" in entry["outcomes"]["site-2"] and len(entry["sites"]) == 2
    assert "site-2 (node" in result.log_text and "declined: site declined" in result.log_text
    audit = [
        json.loads(line)
        for line in audit_path(tmp_path / "sites" / "site-2").read_text().splitlines()
    ]
    assert [e["declined"] for e in audit if e["message_type"] == "train"] == [True, True]
