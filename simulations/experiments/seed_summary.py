"""Mean and sd over seeds of a comparison's rows, ratios and gains, and the issue-3 bars they are read against."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from common.metrics import format_table
from simulations.experiments.arms import HEADLINE, PRIVACY_COLUMNS

THRESHOLDS = {"iid": 0.95, "dirichlet": 0.9}  # issue 3: federated / centralized, R@5 and AUROC
CHECKED = ("mean_R@5", "zs_auroc")


def _headline_order(metrics: Mapping[str, Any]) -> list[str]:
    """``metrics``' keys in the tables' column order (results JSON is written with sorted keys)."""
    return sorted(metrics, key=lambda k: HEADLINE.index(k) if k in HEADLINE else len(HEADLINE))


def _stats(values: Sequence[float]) -> dict[str, Any]:
    array = np.asarray(values, dtype=np.float64)
    sd = float(array.std(ddof=1)) if array.size > 1 else math.nan
    return {"mean": float(array.mean()), "sd": sd, "n": int(array.size), "values": array.tolist()}


def summarize_seeds(entries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and sd over seeds of each method's metrics, the ratios and the gains (one partition).

    ``thresholds``: for each checked metric, whether the mean ratio and every seed's ratio reach
    issue 3's bar for this partition scheme (0.95x IID, 0.9x otherwise).
    """
    methods: dict[str, dict[str, list[float]]] = {}
    for entry in entries:
        for row in entry["rows"]:
            if row["method"].startswith("  "):
                continue  # the individual sites alone
            for key in (*PRIVACY_COLUMNS, *HEADLINE):
                if key in row:
                    methods.setdefault(row["method"], {}).setdefault(key, []).append(row[key])
    summary: dict[str, Any] = {
        "seeds": [e["run"]["seed"] for e in entries],
        "methods": {m: {k: _stats(v) for k, v in ms.items()} for m, ms in methods.items()},
    }
    ratio_values: dict[str, list[float]] = {}
    gain_values: dict[str, dict[str, list[float]]] = {}
    for entry in entries:
        for k, v in entry["federated_over_centralized"].items():
            ratio_values.setdefault(k, []).append(v)
        for name, values in entry["federated_gains"].items():
            for k, v in values.items():
                gain_values.setdefault(name, {}).setdefault(k, []).append(v)
    summary["federated_over_centralized"] = {
        k: _stats(ratio_values[k]) for k in _headline_order(ratio_values)
    }
    summary["federated_gains"] = {
        name: {k: _stats(values[k]) for k in _headline_order(values)}
        for name, values in gain_values.items()
    }
    scheme = str(entries[0]["run"]["partition"]) if entries else "iid"
    bar = THRESHOLDS.get(scheme, THRESHOLDS["dirichlet"])
    summary["thresholds"] = {
        k: {
            "bar": bar,
            "mean_holds": bool(np.mean(ratio_values[k]) >= bar),
            "every_seed_holds": bool(min(ratio_values[k]) >= bar),
            "seeds_holding": int(sum(v >= bar for v in ratio_values[k])),
            "ci95": confidence_interval(ratio_values[k]),
        }
        for k in CHECKED
        if k in ratio_values
    }
    return summary


def confidence_interval(values: Sequence[float], *, level: float = 0.95) -> list[float] | None:
    """Student-t interval for the mean of ``values`` (seeds as independent draws); None below 2."""
    array = np.asarray(values, dtype=np.float64)
    if array.size < 2:
        return None
    half = float(stats.t.ppf(0.5 + level / 2, array.size - 1)) * array.std(ddof=1)
    half /= math.sqrt(array.size)
    return [float(array.mean() - half), float(array.mean() + half)]


def _seeds_verdict(verdict: Mapping[str, Any], seeds: int) -> str:
    if verdict["every_seed_holds"]:
        return "every seed holds"
    return f"{verdict['seeds_holding']} of {seeds} seeds hold"


def _verdict(verdict: Mapping[str, Any]) -> str:
    """The mean ratio against its bar, with the mean's 95% interval."""
    text = "holds" if verdict["mean_holds"] else "NOT met"
    interval = verdict.get("ci95")
    if interval is not None:
        low, high = interval
        text += f" (95% CI of the mean {low:.3f} to {high:.3f}"
        if low < verdict["bar"] <= high:
            text += ": the bar is inside it, so these seeds cannot tell"
        text += ")"
    return text


def _pm(stats: Mapping[str, Any] | None, digits: int = 3) -> str:
    if stats is None:
        return ""
    if stats["n"] < 2:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['sd']:.{digits}f}"


def summary_markdown(summary: Mapping[str, Any]) -> list[str]:
    """The multi-seed tables of one partition: methods, then ratios and gains (mean ± sd)."""
    shown = [
        c for c in (*PRIVACY_COLUMNS, *HEADLINE) if any(c in v for v in summary["methods"].values())
    ]
    rows = [
        {"method": m, "seeds": next(iter(v.values()))["n"], **{c: _pm(v.get(c)) for c in shown}}
        for m, v in summary["methods"].items()
    ]
    lines = [format_table(rows, ["method", "seeds", *shown]), ""]
    gains = summary["federated_gains"]
    metrics = list(summary["federated_over_centralized"])
    if metrics:
        table = [
            {
                "metric": k,
                "federated / centralized": _pm(summary["federated_over_centralized"][k]),
                "federated − frozen": _pm(gains.get("minus_frozen", {}).get(k)),
                "federated − site alone (mean)": _pm(gains.get("minus_alone", {}).get(k)),
            }
            for k in metrics
        ]
        lines += [format_table(table, list(table[0])), ""]
    for k, verdict in summary["thresholds"].items():
        lines.append(
            f"- {k}: federated / centralized bar {verdict['bar']}x: mean {_verdict(verdict)}; "
            f"{_seeds_verdict(verdict, len(summary['seeds']))}"
        )
    return [*lines, ""]
