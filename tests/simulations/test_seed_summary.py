"""Multi-seed summaries: mean and sd of rows, ratios and gains, and the issue-3 bars."""

from __future__ import annotations

from typing import Any

import pytest

from simulations.seed_summary import summarize_seeds


def test_summarize_seeds_reports_mean_sd_and_the_issue_bars() -> None:
    import numpy as np

    def entry(seed: int, fed: float, central: float) -> dict[str, Any]:
        rows = [
            {"method": "frozen (+ lstsq)", "mean_R@5": 0.1, "zs_auroc": 0.6},
            {"method": "each site alone (mean)", "mean_R@5": 0.12, "zs_auroc": 0.6},
            {"method": "centralized (pooled)", "mean_R@5": central, "zs_auroc": 0.7},
            {"method": "federated (fedavg, 3 rounds)", "mean_R@5": fed, "zs_auroc": 0.7},
            {"method": "  site 0 alone", "mean_R@5": 0.5},
        ]
        return {
            "run": {"seed": seed, "partition": "iid"},
            "rows": rows,
            "federated_over_centralized": {"mean_R@5": fed / central, "zs_auroc": 1.0},
            "federated_gains": {"minus_frozen": {"mean_R@5": fed - 0.1}},
        }

    summary = summarize_seeds([entry(0, 0.2, 0.2), entry(1, 0.18, 0.2)])
    ratio = summary["federated_over_centralized"]["mean_R@5"]
    assert ratio["mean"] == pytest.approx(0.95) and ratio["n"] == 2
    assert ratio["sd"] == pytest.approx(np.std([1.0, 0.9], ddof=1))
    assert summary["thresholds"]["mean_R@5"] == {
        "bar": 0.95,
        "mean_holds": True,
        "every_seed_holds": False,
    }
    assert "  site 0 alone" not in summary["methods"]
    gain = summary["federated_gains"]["minus_frozen"]["mean_R@5"]
    assert gain["mean"] == pytest.approx(0.09)
