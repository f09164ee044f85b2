"""The default head vs the best tuned frozen baseline, paired over seeds: `python -m simulations.experiments.default_vs_frozen`.

Issue 15's first bar: on every built-in dataset (and a harder synthetic variant), the default
head (run-config defaults: the ``aligned`` head, loss ``auto``) minus the best tuned frozen
baseline (least squares or CCA, whichever is better per metric) on each headline metric the data
supports: mean over >= 5 paired seeds >= 0, or >= -0.005 with its 95% interval containing 0;
the same table for the centralized head and for the federated one (``--arm``).

One seed of one dataset is one arm of the comparison (``comparison.compare``): the run's dataset
over ``SITES`` simulated sites (partition ``iid`` unless ``--set`` says otherwise), each site's
held-out split halved into validation and test (``split_holdout``). The centralized head is
trained on the pooled training splits and stopped on the pooled validation halves
(``train_selected``); the federated head is a Flower simulation of the sites, stopped at the
round whose checkpoint scores best on the sites' validation halves (``federated_selected``).
Either is scored once on the pooled test halves. The frozen baselines are fitted on the same
training rows and scored on the same test rows: the frozen embeddings' linear probe, and the
closed-form maps (lstsq and CCA), each with its ridge tuned two ways (on the validation halves by
the selection score, as ``arms.frozen_row`` does for lstsq; by 3-fold cross-validation on the
training rows, as ``evaluate_head`` does). Per metric the frozen side is the best of these on
the test rows (which can only favour frozen).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from common.config import RunSettings
from common.embedding import EmbeddedDataset
from common.errors import ConfigError
from common.evaluation import evaluate_head
from common.head_start import validation_scores
from common.metrics import format_table
from common.training import HeadModel
from simulations.benchmarks.results import RESULTS_DIR, write_results
from simulations.experiments.arms import (
    HEADLINE,
    SELECTION,
    Selection,
    concat_embedded,
    federated_selected,
    frozen_row,
    metric_row,
    partition_label,
    prepare_sites,
    ridge_selection,
    run_config_of,
    split_holdout,
    train_selected,
    tuned_alignment,
)
from simulations.experiments.comparison_runs import LOCAL_EPOCHS, ROUNDS, SITES
from simulations.experiments.machine import machine_info
from simulations.experiments.seed_summary import confidence_interval
from simulations.experiments.selection_rules import RULE_ORDER, rule_steps, rules_summary
from simulations.flower.run_config import parse_run_config

RESULT_NAME = "default_vs_frozen"
CHECKED = ("mean_R@5", "zs_acc", "zs_auroc", "probe_f1_macro")
"""Issue 15's headline metrics; each dataset is checked on those its rows have."""
TOLERANCE = 0.005
MIN_SEEDS = 5
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
ARMS = ("centralized", "federated")
"""Which default head a run compares with the frozen baselines (``--arm``)."""


@dataclass(frozen=True)
class DatasetConfig:
    """One dataset configuration: run-config data keys, and an optional generator override.

    ``image_size``: the generated images' side (run-config ``dataset-image-size``; None: the
    generator's own, 64 for synthetic-radiology).
    """

    name: str
    dataset: str
    task: str = ""
    n: int = 0  # 0: the whole dataset (iu-xray-reports, digits)
    image_size: int | None = None
    note: str = ""

    def run_config(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "task": self.task,
            "dataset-n": self.n,
            "dataset-image-size": self.image_size or 0,
        }


DATASETS: dict[str, DatasetConfig] = {
    c.name: c
    for c in (
        DatasetConfig(
            "synthetic-radiology",
            "synthetic-radiology",
            n=RunSettings().dataset_n,
            note="64x64 images (the generator's default)",
        ),
        DatasetConfig(
            "iu-xray-abnormal",
            "iu-xray-reports",
            task="abnormal",
            note="text only (reports, no images)",
        ),
        DatasetConfig(
            "iu-xray-cardiomegaly",
            "iu-xray-reports",
            task="cardiomegaly",
            note="text only (reports, no images)",
        ),
        DatasetConfig(
            "digits", "digits", note="8x8 digits upsampled by the encoder, with captions"
        ),
        DatasetConfig(
            "synthetic-radiology-hard",
            "synthetic-radiology",
            n=RunSettings().dataset_n,
            image_size=24,
            note="harder variant: the generator's image_size knob at 24 (default 64): the "
            "radiographs are drawn at 24x24 and upsampled by the encoder, so small findings "
            "(nodules, thin lines) lose most of their pixels",
        ),
    )
}


# ----- one seed -------------------------------------------------------------------------------


def cca_on_validation(
    train: EmbeddedDataset, val: EmbeddedDataset, test: EmbeddedDataset
) -> tuple[dict[str, Any], Selection]:
    """CCA's counterpart of ``arms.frozen_row``'s lstsq map: the ridge (``RIDGES``) whose map
    scores best on ``val`` by the same score (mean of R@5 and zero-shot AUROC), on ``test``."""
    aligned, selection, ridge = tuned_alignment("cca", train, val, test)
    row = {"method": "frozen + cca (ridge on validation)", "stop": f"ridge {ridge:g}"}
    return {**row, **aligned}, selection


def frozen_candidates(
    train: EmbeddedDataset, val: EmbeddedDataset, test: EmbeddedDataset
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every tuned frozen baseline's row on ``test`` (fitted on ``train``), and their ridge choices.

    The probe on the frozen embeddings is in every row that has it (``metric_row``); paired data
    adds lstsq and CCA, each with the ridge chosen on ``val`` and by cross-validation on ``train``.
    """
    lstsq_val, lstsq_sel = frozen_row("frozen + lstsq (ridge on validation)", train, val, test)
    rows = [lstsq_val]
    selections: dict[str, Any] = {}
    if lstsq_sel is None:  # one modality: the frozen probe is the only baseline
        rows[0]["method"] = "frozen (probe)"
        return rows, selections
    selections[lstsq_val["method"]] = ridge_selection(lstsq_sel)
    cca_val, cca_sel = cca_on_validation(train, val, test)
    rows.append(cca_val)
    selections[cca_val["method"]] = ridge_selection(cca_sel)
    report = evaluate_head(None, train, test, alignments=("lstsq", "cca"))
    for method in ("lstsq", "cca"):
        row = report.row(f"frozen+{method}")
        name = f"frozen + {method} (ridge by 3-fold CV on train)"
        rows.append(
            {"method": name, "stop": f"ridge {row['ridge']:g}"}
            | {k: float(v) for k, v in row.items() if k in HEADLINE and math.isfinite(float(v))}
        )
    probe = report.row("frozen")
    for row in rows:  # the probe of the frozen embeddings belongs to every frozen row
        row.update({k: float(v) for k, v in probe.items() if k in HEADLINE})
    return rows, selections


TUNINGS: dict[str, str] = {
    "any": "",
    "validation": "(ridge on validation)",
    "cv": "(ridge by 3-fold CV on train)",
}
"""The frozen rows a comparison may take its best from, by how their ridge was tuned: "any" (the
strictest: the best of all four maps), "validation" (lstsq or CCA, ridge on the validation
halves, as the head is stopped), "cv" (lstsq or CCA, ridge by CV on train, as ``evaluate_head``).
The frozen probe counts in each."""


def best_frozen(
    rows: Sequence[Mapping[str, Any]], *, tuning: str = "any"
) -> dict[str, dict[str, Any]]:
    """Per metric of ``CHECKED``: the best frozen value on the test rows and the rows that reach
    it, among the rows of ``tuning`` (``TUNINGS``)."""
    best: dict[str, dict[str, Any]] = {}
    mark = TUNINGS[tuning]
    kept = [r for r in rows if mark in str(r["method"]) or "(probe)" in str(r["method"])]
    for metric in CHECKED:
        values = [(float(r[metric]), str(r["method"])) for r in kept if metric in r]
        if not values:
            continue
        top = max(v for v, _ in values)
        best[metric] = {"value": top, "from": [m for v, m in values if v == top]}
    return best


def paired_differences(
    head: Mapping[str, Any], best: Mapping[str, Mapping[str, Any]]
) -> dict[str, float]:
    """The head's row minus the best frozen value, for each metric both sides have."""
    return {m: float(head[m]) - float(best[m]["value"]) for m in CHECKED if m in head and m in best}


def ids_digest(data: EmbeddedDataset) -> str:
    """A short digest of the rows' ids (the pairing: both sides scored on the same rows)."""
    return hashlib.sha256("\n".join(data.ids).encode()).hexdigest()[:16]


def run_seed(
    config: DatasetConfig,
    *,
    seed: int,
    sites: int,
    rounds: int,
    local_epochs: int,
    cache_dir: Path,
    overrides: Mapping[str, Any] | None = None,
    rules: bool = False,
    arm: str = "centralized",
    work_dir: Path | None = None,
) -> dict[str, Any]:
    """One paired seed: the default head of ``arm`` (``ARMS``) and every frozen baseline on the
    same splits; the head's row is the result's ``arm`` key.

    ``rules`` (centralized only): also the head each rule of ``selection_rules.RULES`` (and the
    test oracle) keeps from the same trajectory, scored on test (``rules`` in the result).
    ``work_dir``: the federated arm's Flower runs and site state, one directory per partition and
    settings, dataset and seed (default: ``arms`` beside ``cache_dir``).
    """
    if arm not in ARMS:
        raise ConfigError(f"arm {arm!r} is not one of {', '.join(ARMS)}")
    if rules and arm != "centralized":
        raise ConfigError(
            "--rules scores every step of one centralized trajectory: use --arm centralized"
        )
    run = RunSettings.from_run_config(
        {
            **config.run_config(),
            "min-sites": sites,
            "num-server-rounds": rounds,
            "local-epochs": local_epochs,
            **(overrides or {}),
            "seed": seed,
        }
    )
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    splits = [split_holdout(s) for s in prepare_sites(run, sites, cache_dir=cache_dir)]
    train = concat_embedded([s.train for s in splits])
    val = concat_embedded([s.val for s in splits])
    test = concat_embedded([s.test for s in splits])
    seconds["embedding"] = time.perf_counter() - started

    started = time.perf_counter()
    frozen, ridges = frozen_candidates(train, val, test)
    seconds["frozen"] = time.perf_counter() - started

    started = time.perf_counter()
    states: dict[str, list[dict[str, Any]]] = {}  # per objective tried, each step's state
    test_scores: dict[str, list[float]] = {}

    def keep(step: int, model: HeadModel) -> None:
        states.setdefault(model.objective, []).append(copy.deepcopy(model.state_dict()))
        test_scores.setdefault(model.objective, []).append(
            validation_scores(model, train, test)["score"]
        )

    if arm == "federated":
        # one directory per configuration (partition and settings) and seed: runs never share one
        settings = {k: v for k, v in run_config_of(run).items() if k != "seed"}
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
        home = (work_dir or cache_dir.parent / "arms") / f"{partition_label(run)}-{digest}"
        home = home / config.name / f"seed-{seed}"
        label = f"federated ({run.strategy}, {run.num_server_rounds} rounds)"
        federation, selection = federated_selected(
            label, run_config_of(run), splits, home=home, cache_dir=cache_dir
        )
        model = federation.model
    else:
        model, selection = train_selected(
            run, train, val, steps=run.num_server_rounds, on_step=keep if rules else None
        )
    row = {**metric_row(f"{arm} (default head)", model, train, test), "stop": selection.label}
    seconds[arm] = time.perf_counter() - started

    best = best_frozen(frozen)
    by_rule: dict[str, Any] = {}
    if rules:
        rows: dict[int, dict[str, Any]] = {}
        kept = model.objective  # the rules pick steps of the kept objective's trajectory
        for rule, step in rule_steps(selection.metrics, test_scores[kept]).items():
            if step not in rows:
                model.load_state_dict(states[kept][step])
                rows[step] = metric_row(rule, model, train, test)
            by_rule[rule] = {"step": step, "difference": paired_differences(rows[step], best)}
    return {
        "seed": seed,
        "run": {k: v for k, v in run.to_dict().items() if k not in ("run_dir", "resume")},
        "head": run.head,
        "loss": run.loss,
        "sizes": {"train": len(train), "validation": len(val), "test": len(test)},
        "test_ids_sha256": ids_digest(test),
        arm: row,
        "frozen": frozen,
        "best_frozen": best,
        "difference": paired_differences(row, best),
        "selections": {arm: selection.to_dict(), **ridges},
        "seconds": seconds,
        **({"rules": by_rule} if rules else {}),
    }


# ----- over seeds -----------------------------------------------------------------------------


def verdict(values: Sequence[float]) -> dict[str, Any]:
    """Issue 15's bar on one metric's per-seed differences (the head - best frozen).

    ``holds``: the mean is >= 0, or >= -``TOLERANCE`` with the 95% t-interval of the mean
    containing 0; ``bar_met``: it holds on at least ``MIN_SEEDS`` seeds.
    """
    array = np.asarray(values, dtype=np.float64)
    mean = float(array.mean())
    sd = float(array.std(ddof=1)) if array.size > 1 else math.nan
    interval = confidence_interval(array.tolist())
    covers_zero = interval is not None and interval[0] <= 0.0 <= interval[1]
    if mean >= 0.0:
        status, holds = "holds (mean >= 0)", True
    elif mean >= -TOLERANCE and covers_zero:
        status, holds = f"holds (mean >= -{TOLERANCE:g}, 95% CI contains 0)", True
    else:
        status, holds = "NOT met", False
    bar_met = holds and array.size >= MIN_SEEDS
    if holds and not bar_met:
        status += f" on {array.size} seeds (the bar needs >= {MIN_SEEDS})"
    return {
        "n": int(array.size),
        "values": array.tolist(),
        "mean": mean,
        "sd": sd,
        "ci95": interval,
        "holds": holds,
        "bar_met": bar_met,
        "verdict": status,
    }


def summarize(entries: Sequence[Mapping[str, Any]], *, arm: str) -> dict[str, Any]:
    """Per metric: both sides' means (the head's as ``<arm>_mean``) and the paired differences'
    verdict (``verdict``) against the best of every frozen row (``metrics``), and against the
    rows of each ridge tuning alone (``by_tuning``: "validation", "cv"), recomputed from each
    seed's stored rows."""
    summary: dict[str, Any] = {"seeds": [e["seed"] for e in entries], "metrics": {}}
    for metric in CHECKED:
        paired = [e for e in entries if metric in e["difference"]]
        if not paired:
            continue
        summary["metrics"][metric] = {
            f"{arm}_mean": float(np.mean([e[arm][metric] for e in paired])),
            "best_frozen_mean": float(np.mean([e["best_frozen"][metric]["value"] for e in paired])),
            "difference": verdict([e["difference"][metric] for e in paired]),
        }
    summary["by_tuning"] = {}
    for tuning in ("validation", "cv"):
        diffs: dict[str, list[float]] = {}
        for e in entries:
            best = best_frozen(e["frozen"], tuning=tuning)
            for metric, value in paired_differences(e[arm], best).items():
                diffs.setdefault(metric, []).append(value)
        summary["by_tuning"][tuning] = {m: verdict(v) for m, v in diffs.items()}
    if any("rules" in e for e in entries):
        summary["rules"] = rules_summary(entries, CHECKED, verdict)
    return summary


# ----- report ---------------------------------------------------------------------------------


def _in_order(values: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """``values``' items in ``CHECKED`` order (results JSON is written with sorted keys)."""
    return [(m, values[m]) for m in CHECKED if m in values]


def _short(method: str) -> str:
    """A frozen row's name for the tables: "lstsq/val" (ridge on validation), "cca/cv", "probe"."""
    if "(probe)" in method:
        return "probe"
    kind = "lstsq" if "lstsq" in method else "cca"
    return f"{kind}/{'val' if 'validation' in method else 'cv'}"


def _met(d: Mapping[str, Any]) -> str:
    return "yes" if d["bar_met"] else ("holds, < 5 seeds" if d["holds"] else "NO")


def _ci(interval: Sequence[float] | None) -> str:
    return "" if interval is None else f"[{interval[0]:+.4f}, {interval[1]:+.4f}]"


def dataset_markdown(name: str, result: Mapping[str, Any], *, arm: str) -> list[str]:
    config, summary, entries = result["config"], result["summary"], result["seeds"]
    size = f"n = {config['n']}" if config["n"] else "the whole dataset"
    lines = [f"## {name}\n", f"{config['note']}; {size}; seeds {summary['seeds']}.\n"]
    rows = []
    for metric, s in _in_order(summary["metrics"]):
        d = s["difference"]
        rows.append(
            {
                "metric": metric,
                arm: f"{s[f'{arm}_mean']:.4f}",
                "best frozen": f"{s['best_frozen_mean']:.4f}",
                "difference (mean ± sd)": f"{d['mean']:+.4f} ± {d['sd']:.4f}"
                if d["n"] > 1
                else f"{d['mean']:+.4f}",
                "95% CI": _ci(d["ci95"]),
                "seeds": d["n"],
                "verdict": d["verdict"],
            }
        )
    if rows:
        lines += [format_table(rows, list(rows[0])), ""]
    per_seed = [
        {
            "seed": e["seed"],
            **{m: f"{v:+.4f}" for m, v in _in_order(e["difference"])},
            f"{arm} stop": e[arm]["stop"],
            **{
                f"best frozen {m}": ", ".join(_short(f) for f in e["best_frozen"][m]["from"])
                for m in ("mean_R@5", "zs_auroc")
                if m in e["best_frozen"]
            },
        }
        for e in entries
    ]
    rules = summary.get("rules", {})
    if rules:
        rule_rows = [
            {
                "rule": rule,
                "seeds with a trained step": f"{r['trained_steps']}/{len(entries)}",
                **{
                    m: f"{d['mean']:+.4f} {_ci(d['ci95'])} {_met(d)}"
                    for m, d in _in_order(r["metrics"])
                },
            }
            for rule, r in sorted(rules.items(), key=lambda item: _rule_position(item[0]))
        ]
        lines += [
            "Selection rules on the same trajectories (`--rules`; `selection_rules`): the head "
            "each rule keeps minus the best frozen value, mean [95% CI] and the bar:\n",
            format_table(rule_rows, list(rule_rows[0])),
            "",
        ]
    lines += [
        f"Per seed: {arm} - best frozen, and which frozen rows were best (lstsq or CCA, "
        "ridge chosen on validation `val` or by CV on train `cv`; the probe F1 is always the "
        "frozen embeddings' own probe):\n",
        format_table(per_seed, list(per_seed[0])),
        "",
    ]
    return lines


def _rule_position(rule: str) -> int:
    """Where ``rule`` goes in the reports (results are stored with sorted keys)."""
    return RULE_ORDER.index(rule) if rule in RULE_ORDER else len(RULE_ORDER)


def report_markdown(document: Mapping[str, Any]) -> str:
    settings, (arm, _) = document["settings"], kind(document)
    defaults = f"run-config defaults (head `{settings['head']}`, loss `{settings['loss']}`)"
    if arm == "federated":
        trained = (
            f"Federated: {defaults}, a Flower simulation of the {settings['sites']} sites, "
            f"{settings['rounds']} rounds x {settings['local_epochs']} local epochs (the "
            "comparison runner's budget), stopped at the round whose checkpoint scores best on "
            f"the sites' validation halves ({SELECTION}). "
        )
    else:
        trained = (
            f"Centralized: {defaults}, {settings['rounds']} steps x {settings['local_epochs']} "
            "epochs (the comparison runner's budget), stopped on the pooled validation halves: "
            f"{settings.get('selection', SELECTION)}. "
        )
    lines = [
        f"# Default {arm} head vs the best tuned frozen baseline (issue 15)\n",
        f"Command: `{document['command']}`\n",
        f"Each seed fixes the data (generation or subset, {kind(document)[1]} partition over "
        f"{settings['sites']} sites, splits), the head's initialisation and shuffling. Both sides "
        "are scored on the same rows (the pooled test halves of the sites' held-out splits). "
        + trained
        + "Frozen: per metric, the "
        "best on the test rows of the frozen probe and of the lstsq and CCA maps, each ridge tuned "
        "on validation and by 3-fold CV on train (`vs best of all`: the best of the four maps, "
        "picked on the test rows, which can only favour frozen; `vs validation-tuned` and "
        "`vs cv-tuned`: lstsq or CCA, whichever is better, with that tuning only). Bar: mean difference >= 0, or >= "
        f"-{TOLERANCE:g} with the 95% t-interval containing 0, over >= {MIN_SEEDS} paired seeds.\n",
    ]
    if document.get("note"):
        lines.append(f"Note: {document['note']}\n")
    table = []
    for name, result in document["datasets"].items():
        for metric, s in _in_order(result["summary"]["metrics"]):
            d = s["difference"]
            by = result["summary"].get("by_tuning", {})
            table.append(
                {
                    "dataset": name,
                    "metric": metric,
                    "seeds": d["n"],
                    "vs best of all": f"{d['mean']:+.4f} {_ci(d['ci95'])}",
                    "bar met": _met(d),
                    **{
                        f"vs {t}-tuned": f"{by[t][metric]['mean']:+.4f} {_ci(by[t][metric]['ci95'])}"
                        f" {_met(by[t][metric])}"
                        for t in ("validation", "cv")
                        if metric in by.get(t, {})
                    },
                }
            )
    if table:
        lines += ["## Summary\n", format_table(table, list(table[0])), ""]
    missing = [n for n in document["requested"] if n not in document["datasets"]]
    if missing:
        lines.append(f"Not run (yet): {', '.join(missing)}.\n")
    for name, result in document["datasets"].items():
        lines += dataset_markdown(name, result, arm=arm)
    return "\n".join(lines) + "\n"


# ----- runner ---------------------------------------------------------------------------------


def run_all(
    *,
    names: Sequence[str],
    seeds: Sequence[int],
    out_dir: Path,
    cache_dir: Path,
    sites: int = SITES,
    rounds: int = ROUNDS,
    local_epochs: int = LOCAL_EPOCHS,
    overrides: Mapping[str, Any] | None = None,
    configs: Mapping[str, DatasetConfig] = DATASETS,
    command: str = "",
    keep_existing: bool = False,
    echo: bool = True,
    rules: bool = False,
    arm: str = "centralized",
    work_dir: Path | None = None,
) -> dict[str, Any]:
    """Every dataset of ``names`` over ``seeds``, the head of ``arm`` against the frozen
    baselines (``run_seed``); results written after every seed.

    ``keep_existing``: datasets already in ``out_dir``'s results (of the same arm) and not in
    ``names`` stay.
    """
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise ConfigError(f"unknown dataset configuration {unknown}: one of {', '.join(configs)}")
    default = RunSettings.from_run_config(dict(overrides or {}))
    document: dict[str, Any] = {
        "machine": machine_info(),
        "command": command,
        "requested": list(names),
        "settings": {
            "sites": sites,
            "rounds": rounds,
            "local_epochs": local_epochs,
            "arm": arm,
            "partition": partition_label(default),
            "head": default.head,
            "loss": default.loss,
            "overrides": dict(overrides or {}),
            "seeds": list(seeds),
            "tolerance": TOLERANCE,
            "min_seeds": MIN_SEEDS,
            "selection": SELECTION,
        },
        "datasets": {},
    }
    previous = out_dir / f"{RESULT_NAME}.json"
    if keep_existing and previous.exists():
        old = json.loads(previous.read_text(encoding="utf-8"))
        same_kind([old, document], source=str(previous))
        document["datasets"] = {k: v for k, v in old["datasets"].items() if k not in names}
        document["requested"] = [*document["datasets"], *names]
    for name in names:
        config = configs[name]
        entries: list[dict[str, Any]] = []
        for seed in seeds:
            started = time.perf_counter()
            entry = run_seed(
                config,
                seed=seed,
                sites=sites,
                rounds=rounds,
                local_epochs=local_epochs,
                cache_dir=cache_dir,
                overrides=overrides,
                rules=rules,
                arm=arm,
                work_dir=work_dir,
            )
            entries.append(entry)
            document["datasets"][name] = {
                "config": asdict(config),
                "seeds": entries,
                "summary": summarize(entries, arm=arm),
            }
            write_results(out_dir, RESULT_NAME, document, report_markdown(document))
            if echo:
                shown = ", ".join(f"{m} {v:+.4f}" for m, v in entry["difference"].items())
                print(
                    f"[{time.strftime('%H:%M:%S')}] {name} seed {seed}: {shown} "
                    f"({time.perf_counter() - started:.0f} s; {entry['seconds']})",
                    flush=True,
                )
    return document


def kind(document: Mapping[str, Any]) -> tuple[str, str]:
    """A results document's (arm, partition); documents written before ``--arm`` existed
    compared the centralized head over an iid split."""
    settings = document["settings"]
    return settings.get("arm", "centralized"), settings.get("partition", "iid")


def same_kind(documents: Sequence[Mapping[str, Any]], *, source: str) -> tuple[str, str]:
    """The documents' common (arm, partition); ConfigError if they differ (they do not pool)."""
    kinds = {kind(d) for d in documents}
    if len(kinds) > 1:
        raise ConfigError(
            f"{source}: results of different arms or partitions do not pool: {sorted(kinds)}"
        )
    return kinds.pop()


def merge(dirs: Sequence[Path], *, out_dir: Path) -> dict[str, Any]:
    """One report from several runs' results (each run's datasets, its command and settings); a
    dataset in several runs pools their seeds (a seed run twice keeps the later run's)."""
    documents = [json.loads((d / f"{RESULT_NAME}.json").read_text(encoding="utf-8")) for d in dirs]
    arm, _ = same_kind(documents, source=", ".join(map(str, dirs)))
    merged = dict(documents[-1])
    merged["datasets"], merged["requested"], merged["runs"] = {}, [], []
    for doc in documents:
        for name, result in doc["datasets"].items():
            if name not in merged["datasets"]:
                merged["datasets"][name] = result
                continue
            seeds = {e["seed"]: e for e in merged["datasets"][name]["seeds"]}
            seeds.update({e["seed"]: e for e in result["seeds"]})
            merged["datasets"][name]["seeds"] = [seeds[k] for k in sorted(seeds)]
        merged["requested"] += [n for n in doc["requested"] if n not in merged["requested"]]
        merged["runs"].append({k: doc[k] for k in ("command", "settings", "machine")})
    merged["command"] = " ; ".join(doc["command"] for doc in documents)
    notes = list(dict.fromkeys(doc["note"] for doc in documents if doc.get("note")))
    rules = list(dict.fromkeys(doc["settings"].get("selection", "") for doc in documents))
    if len(rules) > 1:
        notes.append(
            f"The merged runs stopped their {arm} rows by different rules ("
            + "; ".join(
                f"`{doc['command']}`: {doc['settings'].get('selection', '')}" for doc in documents
            )
            + "), so compare rules in the selection-rules tables, which score every rule on every "
            "seed."
        )
    if notes:
        merged["note"] = " ".join(notes)
    for result in merged["datasets"].values():  # from the stored rows, by this module's rules
        result["summary"] = summarize(result["seeds"], arm=arm)
    write_results(out_dir, RESULT_NAME, merged, report_markdown(merged))
    return merged


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--datasets", default=",".join(DATASETS), help=f"comma-separated: {', '.join(DATASETS)}"
    )
    parser.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)))
    parser.add_argument(
        "--synthetic-n",
        type=int,
        default=RunSettings().dataset_n,
        help="pooled examples of the synthetic-radiology configurations (the demo uses 1200)",
    )
    parser.add_argument("--sites", type=int, default=SITES)
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="training steps (rounds)")
    parser.add_argument("--local-epochs", type=int, default=LOCAL_EPOCHS)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--cache", type=Path, default=Path("runs/default_vs_frozen/cache"))
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="the federated arm's Flower runs and site state (default: arms/ beside --cache)",
    )
    parser.add_argument(
        "--arm",
        choices=ARMS,
        default="centralized",
        help="the default head compared: trained on the pooled data, or federated over the sites "
        "(a Flower simulation per seed, under --work)",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        metavar="DIR",
        help="no training: one report in --out from the datasets of earlier runs' --out dirs",
    )
    parser.add_argument(
        "--rules",
        action="store_true",
        help="also score the head every selection rule keeps (simulations.experiments."
        "selection_rules; a diagnostic: each step is scored on test too)",
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help='run-config overrides of the head\'s training, TOML values (e.g. loss="infonce")',
    )
    parser.add_argument(
        "--keep-existing",
        action="store_true",
        help="keep the datasets of --out's earlier results that this run does not redo",
    )
    args = parser.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError as exc:
        raise ConfigError(
            f"--seeds: '{args.seeds}' is not a comma-separated list of integers"
        ) from exc
    if args.merge:
        merge(args.merge, out_dir=args.out)
        print((args.out / f"{RESULT_NAME}.md").read_text(encoding="utf-8"))
        return
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    configs = {
        k: replace(c, n=args.synthetic_n) if c.dataset == "synthetic-radiology" else c
        for k, c in DATASETS.items()
    }
    command = "python -m simulations.experiments.default_vs_frozen " + " ".join(
        argv if argv is not None else __import__("sys").argv[1:]
    )
    run_all(
        names=names,
        seeds=seeds,
        out_dir=args.out,
        cache_dir=args.cache,
        sites=args.sites,
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        command=command.strip(),
        configs=configs,
        keep_existing=args.keep_existing,
        rules=args.rules,
        arm=args.arm,
        work_dir=args.work,
        overrides=parse_run_config(" ".join(args.set), option="--set"),
    )
    print((args.out / f"{RESULT_NAME}.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    from simulations.experiments.entry import run_main

    run_main("default_vs_frozen", main)
