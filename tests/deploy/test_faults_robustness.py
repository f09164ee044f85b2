"""A poisoned site against FedMedian and a site over its privacy budget, with real Flower processes
on 127.0.0.1: the run completes and says who did what.

Both faults live in one federation and one run (module fixture ``robust_run``): site-0 and site-1
are honest, site-2 poisons its update, site-3 is over its privacy budget. Each test reads its own
fact of that run: the poisoned site's (FedMedian's round-1 head against the dumped honest updates)
and the declining site's (its outcome every round, its own audit log)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from client.audit import audit_path
from common.tensorfile import read_tensorfile
from simulations.flower.flwr_cli import RunResult, run_app
from simulations.flower.run_config import ConfigValue
from tests.deploy.faults import (
    RUN_TIMEOUT,
    fault_config,
    federation,
    read_history,
    setup_home,
)

pytestmark = pytest.mark.slow

POISONED = 2  # site-2 adds fault_clientapp.POISON_OFFSET to its honest update
OVER_BUDGET = 3  # site-3's privacy budget is spent before its first round


@dataclass(frozen=True)
class RobustRun:
    home: Path
    run_dir: Path
    dumps: Path
    result: RunResult


@pytest.fixture(scope="module")
def robust_run(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dirs: dict[str, Path], fault_app: Path
) -> RobustRun:
    """Two rounds of FedMedian over 4 sites: 2 honest, 1 poisoned, 1 over its privacy budget."""
    home = tmp_path_factory.mktemp("robustness")
    dumps = home / "honest-updates"
    dumps.mkdir()
    extra: dict[int, dict[str, ConfigValue]] = {
        i: {"fault-dump-dir": str(dumps)} for i in range(POISONED + 1)
    }
    extra[POISONED]["fault"] = "poison"
    extra[OVER_BUDGET] = {"dp-noise-multiplier": 1.0, "dp-max-epsilon": 0.001}
    with pytest.MonkeyPatch.context() as monkeypatch:
        run_dir = setup_home(monkeypatch, home)
        with federation(home, OVER_BUDGET + 1, extra=extra) as (link, _):
            config = fault_config(
                tiny_model_dirs,
                run_dir,
                {
                    "num-server-rounds": 2,
                    "strategy": "fedmedian",
                    "min-sites": 3,
                    "max-update-norm": 1e6,  # the poison passes validation: only robustness can help
                    "report-eval": False,
                    "loss": "proxy",  # sample-level DP (the budget site's node-config) needs it
                },
            )
            result = run_app(fault_app, link.connection, run_config=config, timeout=RUN_TIMEOUT)
    assert result.ok, result.log_text[-3000:]
    return RobustRun(home, run_dir, dumps, result)


def test_fedmedian_keeps_the_head_near_the_honest_sites_despite_a_poisoned_one(
    robust_run: RobustRun,
) -> None:
    first = read_history(robust_run.run_dir)[0]
    assert {f"site-{i}": first["outcomes"][f"site-{i}"] for i in range(POISONED + 1)} == (
        dict.fromkeys(("site-0", "site-1", "site-2"), "aggregated")
    )
    assert len(first["sites"]) == POISONED + 1  # the median of exactly these three updates
    honest = [dict(np.load(robust_run.dumps / f"site-{i}-round1.npz")) for i in range(3)]
    head, _ = read_tensorfile(
        robust_run.run_dir / "checkpoints" / "round-0001.safetensors", key="meta"
    )
    offset = 5.0  # fault_clientapp.POISON_OFFSET
    for name, value in head.items():
        stack = np.stack([h[name] for h in honest])
        sent = stack.copy()
        sent[POISONED] += offset
        # Flower's FedMedian really ran on what the sites sent ...
        np.testing.assert_allclose(value, np.median(sent, axis=0), rtol=1e-5, atol=1e-6)
        # ... and it stays within the honest updates' spread, far from the mean's offset / 3.
        honest_mean = stack.mean(axis=0)
        assert np.abs(value - honest_mean).max() <= np.ptp(stack, axis=0).max() + 1e-6
        assert np.abs(value - honest_mean).max() < 0.05 * offset / 3


def test_site_over_its_privacy_budget_declines_and_the_run_completes(
    robust_run: RobustRun,
) -> None:
    history = read_history(robust_run.run_dir)
    assert [e["round"] for e in history] == [1, 2]
    site = f"site-{OVER_BUDGET}"
    for entry in history:
        assert entry["outcomes"]["site-0"] == entry["outcomes"]["site-1"] == "aggregated"
        assert entry["outcomes"][site].startswith("declined: site declined")
        assert "dp-max-epsilon" in entry["outcomes"][site] and len(entry["sites"]) == 3
    log_text = robust_run.result.log_text
    assert f"{site} (node" in log_text and "declined: site declined" in log_text
    audit = [
        json.loads(line)
        for line in audit_path(robust_run.home / "sites" / site).read_text().splitlines()
    ]
    assert [e["declined"] for e in audit if e["message_type"] == "train"] == [True, True]
