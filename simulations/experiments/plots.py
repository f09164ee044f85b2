"""Matplotlib (Agg) figures of the experiments: metric vs round, utility vs epsilon, per-site metrics."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # after use("Agg"): the backend must be chosen first

from common.atomic import atomic_open

SERVER_PREFIX = "server-"
SITE_EVAL_PREFIX = "eval-"


@dataclass
class Figure:
    """A written PNG, the labels of the data series drawn in it (legend order), and the marked
    points (label, x, y), e.g. the rounds model selection kept."""

    path: Path
    series: list[str] = field(default_factory=list)
    marks: list[tuple[str, float, float]] = field(default_factory=list)


@dataclass(frozen=True)
class EpsilonPoint:
    """One utility measurement at a privacy level (``epsilon`` = inf: no DP); ``spread`` = std."""

    epsilon: float
    value: float
    spread: float = 0.0


def round_series(history: Sequence[Mapping[str, Any]]) -> tuple[str, dict[str, list[float]]]:
    """Per-round metrics of one federated run from its history.jsonl entries.

    The coordinator's held-out evaluation (``server_metrics``, the global head after round r) when
    the run had one; otherwise the sites' example-weighted evaluation of the head they received
    (``eval-*`` in ``site_metrics_mean``: the global head after round r - 1). Returns the source
    ("server" or "sites") and ``{metric: [value per round]}`` with rounds in ``"round"``.
    """
    entries = sorted(history, key=lambda e: int(e["round"]))
    if entries and all(e.get("server_metrics") for e in entries):
        source, prefix, shift = "server", SERVER_PREFIX, 0
        pick = [e["server_metrics"] for e in entries]
    else:
        source, prefix, shift = "sites", SITE_EVAL_PREFIX, -1
        pick = [e.get("site_metrics_mean", {}) for e in entries]
    names = sorted({k for m in pick for k in m if k.startswith(prefix)})
    series: dict[str, list[float]] = {"round": [float(int(e["round"]) + shift) for e in entries]}
    for name in names:
        series[name[len(prefix) :]] = [float(m.get(name, math.nan)) for m in pick]
    return source, series


def history_series(
    histories: Mapping[str, Sequence[Mapping[str, Any]]],
) -> tuple[str, dict[str, dict[str, list[float]]]]:
    """``round_series`` of each federated run's history, and where its numbers come from."""
    picked = {label: round_series(history) for label, history in histories.items()}
    where = " and ".join(
        {"server": "coordinator's held-out set", "sites": "sites' held-out splits"}[s]
        for s in sorted({source for source, _ in picked.values()})
    )
    return where, {label: series for label, (_, series) in picked.items()}


def metric_vs_round(
    series: Mapping[str, Mapping[str, Sequence[float]]],
    path: Path,
    *,
    metric: str,
    where: str = "",
    title: str = "",
    chosen: Mapping[str, int] | None = None,
    references: Mapping[str, float] | None = None,
) -> Figure:
    """One line per federated method: ``metric`` of the global head after each round.

    ``series``: per method, ``{"round": [...], metric: [...]}`` (``round_series``, or the table's
    test set round by round); ``where`` names the set they were scored on (the y label).
    ``chosen``: per method, the round model selection kept (drawn as a star on its line).
    ``references``: horizontal dashed lines, e.g. the frozen baseline's score on the same set.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    drawn: list[str] = []
    marks: list[tuple[str, float, float]] = []
    for label, values in series.items():
        if metric not in values:
            continue
        rounds, ys = list(values["round"]), list(values[metric])
        (line,) = ax.plot(rounds, ys, marker="o", markersize=3, label=label)
        drawn.append(label)
        if chosen and label in chosen and float(chosen[label]) in rounds:
            at = rounds.index(float(chosen[label]))
            ax.plot(
                [rounds[at]],
                [ys[at]],
                marker="*",
                markersize=12,
                color=line.get_color(),
                linestyle="none",
            )
            marks.append((label, rounds[at], ys[at]))
    for label, value in (references or {}).items():
        if math.isfinite(value):
            ax.axhline(value, linestyle="--", linewidth=1, color="0.4" if drawn else None)
            ax.annotate(label, (0.01, value), xycoords=("axes fraction", "data"), fontsize="small")
            drawn.append(label)
    ax.set_xlabel("round")
    ax.set_ylabel(f"{metric} ({where})" if where else metric)
    ax.set_title(
        title or f"{metric} of the global head per round" + (" (★ kept)" if chosen else "")
    )
    figure = _save(fig, ax, path, [d for d in drawn if d not in (references or {})])
    figure.series = drawn
    figure.marks = marks
    return figure


def utility_vs_epsilon(
    series: Mapping[str, Sequence[EpsilonPoint]],
    path: Path,
    *,
    ylabel: str,
    references: Mapping[str, float] | None = None,
    title: str = "",
) -> Figure:
    """Utility against epsilon (log axis); epsilon = inf (no DP) is drawn at the right edge.

    ``references``: horizontal dashed lines (e.g. the frozen embeddings' score), one per label.
    """
    finite = [p.epsilon for points in series.values() for p in points if math.isfinite(p.epsilon)]
    top = max(finite, default=1.0)
    inf_at = top * 4.0
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    drawn: list[str] = []
    for label, points in series.items():
        ordered = sorted(points, key=lambda p: p.epsilon)
        xs = [p.epsilon if math.isfinite(p.epsilon) else inf_at for p in ordered]
        line = ax.errorbar(
            xs,
            [p.value for p in ordered],
            yerr=[p.spread for p in ordered],
            marker="o",
            capsize=3,
            label=label,
        )
        drawn.append(label)
        color = line.lines[0].get_color()
        if references and label in references:
            ax.axhline(references[label], color=color, linestyle="--", linewidth=1)
    ax.set_xscale("log")
    labels = {f"{t:.2g}": t for t in sorted(finite, reverse=True)}  # near-equal spends: one tick
    ax.set_xticks([*labels.values(), inf_at])
    ax.set_xticklabels([*labels, "∞ (no DP)"])
    ax.minorticks_off()
    ax.set_xlabel("epsilon spent (accountant)")
    ax.set_ylabel(ylabel)
    ax.set_title(title or "utility vs privacy" + (" (dashed: frozen)" if references else ""))
    return _save(fig, ax, path, drawn)


def per_site_bars(
    values: Mapping[str, Mapping[str, float]],
    path: Path,
    *,
    metric: str,
    title: str = "",
) -> Figure:
    """Grouped bars: for each site (``values`` key), one bar per method (inner keys, in order)."""
    sites = list(values)
    methods: list[str] = []
    for per_method in values.values():
        methods.extend(m for m in per_method if m not in methods)
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6.4, 1.2 * len(sites) + 3), 4.0))
    for j, method in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(sites))]
        ys = [float(values[s].get(method, math.nan)) for s in sites]
        ax.bar(xs, ys, width=width, label=method)
    ax.set_xticks(range(len(sites)))
    ax.set_xticklabels(sites)
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} on each site's own held-out split")
    return _save(fig, ax, path, methods)


def _save(fig: Any, ax: Any, path: Path, drawn: list[str]) -> Figure:
    if drawn:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=120)
    plt.close(fig)
    return Figure(path=path, series=drawn)
