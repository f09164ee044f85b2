"""Multi-seed summaries: mean and sd of rows, ratios and gains, and the issue-3 bars."""

from __future__ import annotations

from typing import Any

import pytest

from simulations.experiments.seed_summary import summarize_seeds, summary_markdown


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
    verdict = summary["thresholds"]["mean_R@5"]
    assert {k: verdict[k] for k in ("bar", "mean_holds", "every_seed_holds")} == {
        "bar": 0.95,
        "mean_holds": True,
        "every_seed_holds": False,
    }
    assert verdict["seeds_holding"] == 1
    # t-interval with 1 degree of freedom: 0.95 ± 12.706 x sd / sqrt(2)
    half = 12.7062 * np.std([1.0, 0.9], ddof=1) / np.sqrt(2)
    assert verdict["ci95"] == pytest.approx([0.95 - half, 0.95 + half], abs=1e-3)
    assert "  site 0 alone" not in summary["methods"]
    gain = summary["federated_gains"]["minus_frozen"]["mean_R@5"]
    assert gain["mean"] == pytest.approx(0.09)


def test_the_bar_verdict_says_when_the_seeds_cannot_tell() -> None:
    def entry(seed: int, ratio: float) -> dict[str, Any]:
        rows = [{"method": "federated", "mean_R@5": ratio}]
        return {
            "run": {"seed": seed, "partition": "dirichlet"},
            "rows": rows,
            "federated_over_centralized": {"mean_R@5": ratio},
            "federated_gains": {},
        }

    noisy = summarize_seeds([entry(s, r) for s, r in enumerate((0.8, 1.0, 0.95))])
    line = next(x for x in summary_markdown(noisy) if x.startswith("- mean_R@5"))
    assert "bar 0.9x: mean holds (95% CI of the mean" in line and "cannot tell" in line
    assert line.endswith("; 2 of 3 seeds hold")
    tight = summarize_seeds([entry(s, r) for s, r in enumerate((0.99, 1.0, 1.01))])
    line = next(x for x in summary_markdown(tight) if x.startswith("- mean_R@5"))
    assert "cannot tell" not in line and line.endswith("every seed holds")
    assert summarize_seeds([entry(0, 0.95)])["thresholds"]["mean_R@5"]["ci95"] is None
