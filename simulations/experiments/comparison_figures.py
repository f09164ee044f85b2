"""The comparison's figures: metric vs round, per-site bars, utility vs epsilon."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from simulations.experiments.arms import SAMPLE_DP_LOSS

if TYPE_CHECKING:
    from simulations.experiments.comparison import Comparison


def plot_comparison(comparison: Comparison, out_dir: Path, *, prefix: str) -> list[Path]:
    """The comparison's figures in ``out_dir``: metric vs round, per-site bars, utility vs epsilon."""
    from simulations.experiments.plots import (
        history_series,
        metric_vs_round,
        per_site_bars,
        utility_vs_epsilon,
    )

    metric = comparison.primary
    written: list[Path] = []
    if comparison.round_test or comparison.histories:
        if comparison.round_test:  # the table's test set, with the table's baselines
            per_round, where = comparison.round_test, "the table's test set"
            round_metric = metric
            references = {
                str(row["method"]): float(row[metric])
                for row in comparison.rows
                if metric in row
                and not row["method"].startswith(("federated", "  "))
                and "privacy" not in row
            }
        else:  # older results: the federation's own per-round evaluation
            where, per_round = history_series(comparison.histories)
            round_metric = _round_metric(comparison.histories, metric)
            references = {}
        written.append(
            metric_vs_round(
                per_round,
                out_dir / f"{prefix}_metric_vs_round.png",
                metric=round_metric,
                where=where,
                title=f"{round_metric} per round ({comparison.partition}, {comparison.sites} sites, "
                "★ kept, dashed: baselines)",
                chosen={
                    label: int(comparison.selections[label]["chosen"])
                    for label in per_round
                    if label in comparison.selections
                },
                references=references,
            ).path
        )
    if comparison.per_site:
        written.append(
            per_site_bars(
                {
                    s: {m: r.get(metric, math.nan) for m, r in v.items()}
                    for s, v in comparison.per_site.items()
                },
                out_dir / f"{prefix}_per_site.png",
                metric=metric,
                title=f"{metric} on each site's own test rows",
            ).path
        )
    series = _epsilon_series(comparison, metric)
    if series:
        frozen = comparison.rows[0].get(metric)
        written.append(
            utility_vs_epsilon(
                series,
                out_dir / f"{prefix}_utility_vs_epsilon.png",
                ylabel=f"{metric} (pooled held-out)",
                references={label: frozen for label in series} if frozen is not None else None,
            ).path
        )
    return written


def _round_metric(histories: Mapping[str, Sequence[Mapping[str, Any]]], metric: str) -> str:
    """The per-round name of ``metric`` (the round evaluation is cheaper: R@5, zs_acc, centroid_acc)."""
    from simulations.experiments.plots import round_series

    wanted = {"mean_R@5": "R@5", "mean_R@1": "R@1"}.get(metric, metric)
    available = [m for h in histories.values() for m in round_series(h)[1] if m != "round"]
    return wanted if wanted in available or not available else available[0]


def _epsilon_series(comparison: Comparison, metric: str) -> dict[str, list[Any]]:
    """Each DP arm against its non-private federated baseline (the same loss) at epsilon = inf."""
    from simulations.experiments.plots import EpsilonPoint

    by_kind = {str(r["privacy"]): r for r in comparison.rows if r.get("privacy")}
    plain = [
        r for r in comparison.rows if r["method"].startswith("federated") and "privacy" not in r
    ]
    proxy = next((r for r in plain if f"{SAMPLE_DP_LOSS} loss" in r["method"]), None)
    baselines = {
        "sample-level": proxy or (plain[0] if plain else None),
        "client-level": plain[0] if plain else None,
    }
    names = {
        "sample-level": "sample-level DP (ε per example)",
        "client-level": "client-level DP (ε per site)",
    }
    series: dict[str, list[Any]] = {}
    for kind, row in by_kind.items():
        if metric not in row:
            continue
        points = [EpsilonPoint(float(row["epsilon"]), float(row[metric]))]
        base = baselines.get(kind)
        if base is not None and metric in base:
            points.append(EpsilonPoint(math.inf, float(base[metric])))
        series[names[kind]] = points
    return series
