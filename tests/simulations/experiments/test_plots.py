"""The experiment figures: valid PNGs with one series per method/dataset, read from real history shapes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest

from simulations.experiments.plots import (
    EpsilonPoint,
    history_series,
    metric_vs_round,
    per_site_bars,
    round_series,
    utility_vs_epsilon,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _history(rounds: int, *, server: bool, start: float) -> list[dict[str, Any]]:
    """History entries shaped like server/app.py's _log_round writes them."""
    out = []
    for r in range(1, rounds + 1):
        out.append(
            {
                "round": r,
                "site_metrics_mean": {"eval-R@5": start + 0.01 * r, "train-loss": 1.0 / r},
                "server_metrics": {"server-R@5": start + 0.1 * r} if server else {},
            }
        )
    return out


def _assert_png(path: Path) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert float(image[..., :3].std()) > 0.01  # something was drawn, not a blank canvas
    return image


def test_round_series_prefers_server_metrics_and_shifts_site_evaluation() -> None:
    source, series = round_series(list(reversed(_history(3, server=True, start=0.0))))
    assert source == "server"
    assert series["round"] == [1.0, 2.0, 3.0]
    assert series["R@5"] == pytest.approx([0.1, 0.2, 0.3])
    # Without a coordinator evaluation: the sites scored the head they received (after r - 1).
    source, series = round_series(_history(3, server=False, start=0.5))
    assert source == "sites"
    assert series["round"] == [0.0, 1.0, 2.0]
    assert series["R@5"] == pytest.approx([0.51, 0.52, 0.53])
    assert "train-loss" not in series and "loss" not in series


def test_metric_vs_round_draws_one_line_per_method_with_the_metric(tmp_path: Path) -> None:
    histories = {
        "federated": _history(4, server=True, start=0.0),
        "federated + sample-level DP": _history(4, server=True, start=0.05),
        "federated + client-level DP": _history(4, server=True, start=0.1),
        "no such metric": [{"round": 1, "server_metrics": {"server-zs_acc": 0.2}}],
    }
    where, series = history_series(histories)
    assert where == "coordinator's held-out set"
    figure = metric_vs_round(series, tmp_path / "rounds.png", metric="R@5", where=where)
    assert figure.series == list(histories)[:3]
    assert figure.marks == []
    _assert_png(figure.path)


def test_metric_vs_round_stars_the_round_model_selection_kept(tmp_path: Path) -> None:
    histories = {
        "federated": _history(4, server=True, start=0.0),
        "federated + client-level DP": _history(4, server=True, start=0.1),
    }
    _, series = round_series(histories["federated"])
    chosen = {"federated": 3, "federated + client-level DP": 9, "absent": 1}  # 9: not a round
    figure = metric_vs_round(
        history_series(histories)[1],
        tmp_path / "kept.png",
        metric="R@5",
        chosen=chosen,
        references={"frozen": 0.25, "centralized": math.nan},
    )
    assert figure.marks == [("federated", 3.0, series["R@5"][2])]
    # a finite reference is a dashed line in the figure; a NaN one is left out
    assert figure.series == ["federated", "federated + client-level DP", "frozen"]
    _assert_png(figure.path)


def test_utility_vs_epsilon_places_no_dp_point_and_counts_series(tmp_path: Path) -> None:
    series = {
        "synthetic-radiology": [
            EpsilonPoint(0.98, 0.40, 0.02),
            EpsilonPoint(math.inf, 0.55, 0.01),
            EpsilonPoint(2.9, 0.47),
        ],
        "iu-xray-reports": [EpsilonPoint(7.7, 0.60), EpsilonPoint(math.inf, 0.62)],
    }
    figure = utility_vs_epsilon(
        series, tmp_path / "eps.png", ylabel="F1", references={"iu-xray-reports": 0.58}
    )
    assert figure.series == ["synthetic-radiology", "iu-xray-reports"]
    _assert_png(figure.path)


def test_per_site_bars_one_series_per_method_union_over_sites(tmp_path: Path) -> None:
    values = {
        "site 0": {"this site alone": 0.3, "federated": 0.5},
        "site 1": {"this site alone": 0.2, "federated": 0.45, "centralized": 0.5},
    }
    figure = per_site_bars(values, tmp_path / "sub" / "sites.png", metric="zs_acc")
    assert figure.series == ["this site alone", "federated", "centralized"]
    _assert_png(figure.path)
