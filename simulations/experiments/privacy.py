"""Utility vs epsilon: federated training with sample-level DP (Opacus DP-SGD at every site) at several
privacy levels, with a loss valid under DP-SGD (default ``auto``: the best per-example objective the
data supports, common/registries.py ``choose_loss``)."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from common.atomic import append_line
from common.config import RunSettings
from common.embedding import EmbeddedDataset
from common.errors import ConfigError, PrivacyError
from common.metrics import format_table
from common.privacy import PrivacySettings, sample_dp_loss_choices
from common.registries import AUTO_LOSS, loss_info
from common.training import objective_for
from simulations.benchmarks.results import RESULTS_DIR, write_results
from simulations.experiments.arms import (
    HEADLINE,
    concat_embedded,
    federate,
    metric_row,
    prepare_sites,
    run_config_of,
)
from simulations.experiments.machine import machine_info
from simulations.flower.run_config import parse_run_config

DEFAULT_OUT = RESULTS_DIR / "privacy"
SITES = 4
"""Sites of every study run (rounds and local epochs: RunSettings' defaults)."""
EPSILONS: tuple[float, ...] = (1.0, 3.0, 8.0, math.inf)
METRIC = "probe_f1_macro"  # defined for paired and text-only data
RATIOS = ("zs_auroc", "mean_R@5")  # the bars: DP / no DP, same loss family
FROZEN_SHOWN = ("zs_auroc", "mean_R@5", METRIC)  # the frozen baseline (+ tuned map) beside
# dataset -> its run-config (dataset-n 0 = every example)
DATASETS: dict[str, dict[str, Any]] = {
    "synthetic-radiology": {"dataset-n": 2000},
    "iu-xray-reports": {"dataset-n": 0, "task": "abnormal"},
}
_SLACK = 1e-9


def _label(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


def study_run(
    *,
    dataset: str,
    seed: int,
    sites: int,
    rounds: int,
    local_epochs: int,
    overrides: Mapping[str, Any],
    loss: str = AUTO_LOSS,
) -> RunSettings:
    """The non-private run settings of one (dataset, seed): ``loss``, IID split over ``sites``."""
    if dataset not in DATASETS and "dataset-n" not in overrides:
        raise ConfigError(f"dataset '{dataset}': give its dataset-n in overrides")
    return RunSettings.from_run_config(
        {
            "dataset": dataset,
            **DATASETS.get(dataset, {}),
            "loss": loss,
            "partition": "iid",
            "min-sites": sites,
            "num-server-rounds": rounds,
            "local-epochs": local_epochs,
            "seed": seed,
            **overrides,
        }
    )


def run_study(
    *,
    out_dir: Path,
    work_dir: Path,
    datasets: Sequence[str] = tuple(DATASETS),
    epsilons: Sequence[float] = EPSILONS,
    seeds: Sequence[int] = (0, 1),
    sites: int = SITES,
    rounds: int = RunSettings().num_server_rounds,
    local_epochs: int = RunSettings().local_epochs,
    delta: float = 1e-5,
    max_grad_norm: float = 1.0,
    overrides: Mapping[str, Any] | None = None,
    loss: str = AUTO_LOSS,
    echo: bool = False,
) -> dict[str, Any]:
    """Every (dataset, seed, epsilon) as a federated Flower simulation; summary JSON, markdown, PNG.

    Each run is a fresh consortium whose sites calibrate DP-SGD to ``dp-target-epsilon`` for the
    whole run; epsilon = inf is the same federation without DP (splits, seed and the per-example
    loss the DP sites train: ``private_objective``). The
    epsilon reported is the largest any site's accountant recorded (its audit log); a run whose
    spend exceeds its target raises PrivacyError. Finished runs are kept in
    ``work_dir``/runs.jsonl and reused when the study is started again.
    """
    if not epsilons or any(not (e > 0) for e in epsilons):
        raise ConfigError(f"epsilons must be > 0 (inf = no DP), got {list(epsilons)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    journal = work_dir / "runs.jsonl"
    done = _journal(journal)
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    frozen: list[dict[str, Any]] = []
    for dataset in datasets:
        for seed in seeds:
            run = study_run(
                dataset=dataset,
                seed=seed,
                sites=sites,
                rounds=rounds,
                local_epochs=local_epochs,
                overrides=overrides or {},
                loss=loss,
            )
            site_data = prepare_sites(run, sites, cache_dir=work_dir / "cache")
            train = concat_embedded([s.train for s in site_data])
            test = concat_embedded([s.test for s in site_data])
            frozen.append(
                {"dataset": dataset, "seed": seed, **metric_row("frozen", None, train, test)}
            )
            same_family = private_objective(run, train)
            for epsilon in epsilons:
                key = f"{dataset}/seed-{seed}/eps-{_label(epsilon)}"
                if key not in done:
                    arm = run if not math.isinf(epsilon) else replace(run, loss=same_family)
                    done[key] = _one_run(
                        key, arm, epsilon, delta, max_grad_norm, sites, work_dir, train, test, echo
                    )
                    append_line(journal, json.dumps(done[key], sort_keys=True))
                runs.append(done[key])
    document = {
        "experiment": "utility vs epsilon, sample-level DP (Opacus DP-SGD at every site)",
        "setting": f"federated (Flower simulation), {sites} sites, IID, {rounds} rounds x "
        f"{local_epochs} local epochs, loss {loss}",
        "metric": METRIC,
        "delta": delta,
        "max_grad_norm": max_grad_norm,
        "accountant": str((overrides or {}).get("dp-accountant", PrivacySettings().accountant)),
        "seeds": list(seeds),
        "summary": summarize(runs, frozen),
        "runs": runs,
        "frozen": frozen,
        "machine": machine_info(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    figure = plot_study(document, out_dir / "utility_vs_epsilon.png")
    write_results(out_dir, "privacy", _json_safe(document), render_markdown(document, figure.name))
    return document


def private_objective(run: RunSettings, train: EmbeddedDataset) -> str:
    """The per-example loss a site trains with under DP-SGD: the run's loss itself, or for
    ``auto`` what it chooses on ``train`` (``objective_for(private=True)``, as the sites do). The
    study's epsilon = inf arm trains it without DP, so the DP arms are read against the same loss
    family."""
    if not loss_info(run.loss).auto:
        return run.loss
    return objective_for(train, layout=run.layout, towers=train.dims, private=True)[0]


def _one_run(
    key: str,
    run: RunSettings,
    epsilon: float,
    delta: float,
    max_grad_norm: float,
    sites: int,
    work_dir: Path,
    train: Any,
    test: Any,
    echo: bool,
) -> dict[str, Any]:
    dp = (
        {}
        if math.isinf(epsilon)
        else {"dp-target-epsilon": epsilon, "dp-delta": delta, "dp-max-grad-norm": max_grad_norm}
    )
    started = time.perf_counter()
    arm = federate(
        label=key,
        run_config=run_config_of(run, **dp),
        sites=sites,
        home=work_dir / key,
        cache_dir=work_dir / "cache",
        echo=echo,
    )
    row = metric_row(key, arm.model, train, test)
    spent = arm.privacy.get("epsilon", math.inf)
    if spent > epsilon + _SLACK:
        raise PrivacyError(f"{key}: a site spent epsilon {spent:.6g} > target {epsilon:g}")
    sigmas = [
        m["dp-noise-multiplier"]
        for e in arm.history
        for m in e["site_metrics"].values()
        if "dp-noise-multiplier" in m
    ]
    return {
        "key": key,
        "dataset": run.dataset,
        "seed": run.seed,
        "target_epsilon": epsilon,
        "loss": run.loss,
        "epsilon": spent,
        "epsilon_per_site": arm.privacy.get("epsilon_per_site", {}),
        "delta": delta if dp else None,
        "noise_multiplier_mean": statistics.fmean(sigmas) if sigmas else 0.0,
        "rounds_completed": len(arm.history),
        "seconds": round(time.perf_counter() - started, 1),
        **{k: v for k, v in row.items() if k in HEADLINE},
    }


def summarize(
    runs: Sequence[Mapping[str, Any]], frozen: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """One row per (dataset, target epsilon): metrics mean and std over seeds, largest epsilon spent."""
    rows: list[dict[str, Any]] = []
    for dataset in dict.fromkeys(r["dataset"] for r in runs):
        base = [f for f in frozen if f["dataset"] == dataset]
        targets = sorted({float(r["target_epsilon"]) for r in runs if r["dataset"] == dataset})
        for target in targets:
            group = [r for r in runs if r["dataset"] == dataset and r["target_epsilon"] == target]
            row: dict[str, Any] = {
                "dataset": dataset,
                "target_epsilon": target,
                "epsilon": max(float(r["epsilon"]) for r in group),
                "delta": group[0]["delta"],
                "noise_multiplier_mean": statistics.fmean(
                    float(r["noise_multiplier_mean"]) for r in group
                ),
                "seeds": len(group),
            }
            for metric in HEADLINE:
                values = [float(r[metric]) for r in group if metric in r]
                if values:
                    row[metric] = statistics.fmean(values)
                    row[f"{metric}_std"] = statistics.pstdev(values) if len(values) > 1 else 0.0
            for metric in FROZEN_SHOWN:
                frozen_values = [float(f[metric]) for f in base if metric in f]
                if frozen_values:
                    row[f"frozen_{metric}"] = statistics.fmean(frozen_values)
            no_dp = {
                r["seed"]: r
                for r in runs
                if r["dataset"] == dataset and math.isinf(float(r["target_epsilon"]))
            }
            for metric in RATIOS:  # paired by seed: DP run / the same seed's run without DP
                ratios = [
                    float(r[metric]) / float(no_dp[r["seed"]][metric])
                    for r in group
                    if metric in r and r["seed"] in no_dp and float(no_dp[r["seed"]][metric]) > 0
                ]
                if ratios and not math.isinf(target):
                    row[f"{metric}_ratio"] = statistics.fmean(ratios)
                    row[f"{metric}_ratio_min"] = min(ratios)
            rows.append(row)
    return rows


def plot_study(document: Mapping[str, Any], path: Path) -> Path:
    """utility_vs_epsilon.png: one line per dataset (epsilon spent on x), frozen as dashed lines."""
    from simulations.experiments.plots import EpsilonPoint, utility_vs_epsilon

    series: dict[str, list[EpsilonPoint]] = {}
    references: dict[str, float] = {}
    for row in document["summary"]:
        if METRIC not in row:
            continue
        series.setdefault(row["dataset"], []).append(
            EpsilonPoint(float(row["epsilon"]), float(row[METRIC]), float(row[f"{METRIC}_std"]))
        )
        if f"frozen_{METRIC}" in row:
            references[row["dataset"]] = float(row[f"frozen_{METRIC}"])
    return utility_vs_epsilon(
        series,
        path,
        ylabel=f"{METRIC} (mean ± std over seeds)",
        references=references,
        title="sample-level DP (dashed: frozen embeddings)",
    ).path


def render_markdown(document: Mapping[str, Any], figure: str) -> str:
    """The study's table (every epsilon is the accountant's) and its figure."""
    shown: list[dict[str, Any]] = []
    metrics = [m for m in HEADLINE if any(m in r for r in document["summary"])]
    for row in document["summary"]:
        cells: dict[str, Any] = {
            "dataset": row["dataset"],
            "setting": "federated",
            "target ε": _label(row["target_epsilon"]),
            "ε spent (max over sites, seeds)": "∞ (no DP)"
            if math.isinf(row["epsilon"])
            else f"{row['epsilon']:.3f}",
            "δ": "" if row["delta"] is None else f"{row['delta']:g}",
            "σ (mean)": f"{row['noise_multiplier_mean']:.3f}" if row["delta"] else "0",
        }
        for metric in metrics:
            if metric in row:
                spread = f" ± {row[f'{metric}_std']:.4f}" if row["seeds"] > 1 else ""
                cells[metric] = f"{row[metric]:.4f}{spread}"
        for metric in RATIOS:
            if f"{metric}_ratio" in row:
                cells[f"{metric} / no DP (min over seeds)"] = (
                    f"{row[f'{metric}_ratio']:.2f}x ({row[f'{metric}_ratio_min']:.2f}x)"
                )
        for metric in FROZEN_SHOWN:
            if f"frozen_{metric}" in row:
                cells[f"frozen {metric}"] = f"{row[f'frozen_{metric}']:.4f}"
        shown.append(cells)
    columns = list(dict.fromkeys(k for r in shown for k in r))
    lines = [
        "# Utility vs epsilon: sample-level DP (Opacus DP-SGD at each site)",
        "",
        f"{document['setting']}; seeds {document['seeds']}; δ = {document['delta']:g}, "
        f"per-example clipping norm {document['max_grad_norm']:g}. Metrics on the pooled held-out "
        "splits of all sites (mean ± std when several seeds). Each site calibrates its noise multiplier σ "
        "so that the whole run costs at most the target ε (accountant "
        f"{document.get('accountant', 'rdp').upper()}, Poisson sampling); 'ε spent' is the "
        "largest total any site's accountant reported (its audit log). "
        "The ∞ rows are the same federation without DP (same splits and seeds, and the same "
        "per-example loss the DP sites trained with: what auto chooses under DP).",
        "",
        format_table(shown, columns),
        "",
        f"![utility vs epsilon]({figure})",
        "",
        f"Machine: {document['machine']}; {document['seconds']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def _journal(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    entries = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return {e["key"]: e for e in entries}


def _json_safe(value: Any) -> Any:
    """inf as the string "inf" (JSON has no infinity)."""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--work", default="runs/exp-privacy")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--epsilons", default=",".join(_label(e) for e in EPSILONS))
    parser.add_argument("--seeds", default="0,1")
    run = RunSettings()
    parser.add_argument("--sites", type=int, default=SITES)
    parser.add_argument("--rounds", type=int, default=run.num_server_rounds)
    parser.add_argument("--local-epochs", type=int, default=run.local_epochs)
    parser.add_argument(
        "--loss",
        default=AUTO_LOSS,
        choices=sample_dp_loss_choices(),
        help="a loss valid under DP-SGD (auto: the best per-example objective for the data)",
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="run-config overrides for every run, TOML values (e.g. batch-size=256 dp-lr=0.003)",
    )
    args = parser.parse_args(argv)
    document = run_study(
        out_dir=Path(args.out),
        work_dir=Path(args.work),
        datasets=[d.strip() for d in args.datasets.split(",")],
        epsilons=[float(e) for e in args.epsilons.split(",")],
        seeds=[int(s) for s in args.seeds.split(",")],
        sites=args.sites,
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        loss=args.loss,
        overrides=parse_run_config(" ".join(args.set), option="--set"),
    )
    print((Path(args.out) / "privacy.md").read_text())
    print(f"{len(document['runs'])} runs")


if __name__ == "__main__":
    from simulations.experiments.entry import run_main

    run_main("privacy", main)
