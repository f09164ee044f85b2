"""IU X-ray reports experiment: summaries over seeds (paired with frozen and central) and the markdown report."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from common.metrics import format_table
from simulations.experiments.iu_xray_arms import CENTRAL, FROZEN, MATCHED


def summarize(
    runs: list[dict[str, Any]], *, task: str, keys: Sequence[str], classifiers: Sequence[str]
) -> dict[str, dict[str, dict[str, float]]]:
    """Per variant and classifier: mean/std/median/min/max over seeds, and the paired change vs frozen."""
    by_seed = {(run["variant"], run["seed"]): run["f1"] for run in runs if run["task"] == task}
    seeds = sorted({seed for (_, seed) in by_seed})
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for key in keys:
        summary[key] = {}
        for name in classifiers:
            values = np.array([by_seed[(key, s)][name] for s in seeds])
            deltas = values - np.array([by_seed[(FROZEN, s)][name] for s in seeds])
            summary[key][name] = {
                "mean": float(values.mean()),
                "std": _std(values),
                "median": float(np.median(values)),
                "min": float(values.min()),
                "max": float(values.max()),
                "n": len(values),
                "delta_mean": float(deltas.mean()),
                "delta_std": _std(deltas),
            }
    return summary


def federated_vs_central(
    runs: list[dict[str, Any]], *, task: str, fed_keys: Sequence[str], classifiers: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Per federated variant: paired (by seed) F1 differences to the central head of the same
    preset and loss ("central", all training reports) and to the matched central head ("matched",
    the rows the sites trained on), per classifier and averaged over the classifiers."""
    by_seed = {(run["variant"], run["seed"]): run["f1"] for run in runs if run["task"] == task}
    seeds = sorted({seed for (_, seed) in by_seed})
    out: dict[str, dict[str, Any]] = {}
    for key in fed_keys:
        head, loss, tag = key.split("/")
        refs = {
            CENTRAL: f"{head}/{loss}",
            MATCHED: f"{head}/{loss}/{tag.replace('fed-', 'matched-')}",
        }
        out[key] = {}
        for arm, ref in refs.items():
            if not all((ref, s) in by_seed for s in seeds):
                continue
            diffs = np.array(
                [[by_seed[(key, s)][n] - by_seed[(ref, s)][n] for n in classifiers] for s in seeds]
            )
            per_seed_mean = diffs.mean(axis=1)
            out[key][arm] = {
                "reference": ref,
                "per_classifier": {
                    n: {"delta_mean": float(diffs[:, j].mean()), "delta_std": _std(diffs[:, j])}
                    for j, n in enumerate(classifiers)
                },
                "all_classifiers": {
                    "delta_mean": float(per_seed_mean.mean()),
                    "delta_std": _std(per_seed_mean),
                },
            }
    return out


def _std(values: np.ndarray) -> float:
    """Sample standard deviation (ddof=1); 0 for a single value."""
    return float(values.std(ddof=1)) if values.size > 1 else 0.0


def _cell(stats: dict[str, float], *, delta: bool = False) -> str:
    if delta:
        return f"{stats['delta_mean']:+.3f} ± {stats['delta_std']:.3f}"
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def render_markdown(document: dict[str, Any]) -> str:
    """Tables per task: mean ± std macro-F1 (variants x classifiers), change vs frozen, federated vs central."""
    config = document["config"]
    names: list[str] = config["classifiers"]
    labels: dict[str, str] = document["variants"]
    arms: dict[str, str] = document["arms"]
    seeds = config["seeds"]
    train = config["train"]
    lines = [
        f"# IU X-ray reports: frozen vs projected {config['text_encoder']} embeddings, central and federated",
        "",
        f"Held-out macro-F1 (mean ± sample std over {len(seeds)} seed(s) {seeds}). Seed s fixes "
        f"a random {1 - config['test_fraction']:.0%}/{config['test_fraction']:.0%} train/test split "
        "of the reports (training = the dataset loader's seeded subset, the exact pool the "
        "federated sites partition; test = the remaining reports, which no site ever loads), the "
        "heads' initialisation, the partition and the classifiers' seed. Heads were trained on "
        f"the labelled training reports only ({train['epochs']} epochs, batch "
        f"{train['batch_size']}, lr {train['lr']}, AdamW); classifiers "
        "(common.metrics.classifier_suite) were fitted on all training reports, projected by "
        "the row's head, and scored on the held-out ones. Rows: the frozen encoder output, each "
        "head preset (layer widths) trained centrally with each loss, then the federated heads.",
    ]
    fed = config.get("federation")
    if fed:
        lines += [
            "",
            f"Federated rows: FedAvg over {fed['sites']} simulated sites on Flower's simulation "
            f"engine (the project's ServerApp and ClientApp), {fed['rounds']} rounds x "
            f"{fed['local_epochs']} local epochs = the central epochs, same batch size and lr. "
            "Each site holds one partition of that seed's training reports (iid, or label skew "
            f"with Dirichlet α={fed['alpha']:g}) and, like any site, keeps 20% of its share as its "
            "own held-out split, so the federation trains on ~80% of the training reports. The "
            "sites' data bundles are read back after every run and checked to hold no test "
            'report. "Matched" = one central head trained on exactly the rows the sites '
            "trained on: federated − matched isolates the cost of federating from the data "
            "the sites keep for their own evaluation.",
        ]
    if config["n"] is not None:
        lines.append(f"Subset: {config['n']} reports.")
    for task, summary in document["summary"].items():
        counts = document["data"][task][f"seed{seeds[0]}"]
        lines += ["", f"## Task `{task}`", "", f"Split of seed {seeds[0]}: {_counts(counts)}.", ""]
        shown = [key for key in summary if arms[key] != MATCHED]
        rows = [
            {"embeddings": labels[key], **{n: _cell(summary[key][n]) for n in names}}
            for key in shown
        ]
        lines += [format_table(rows, ["embeddings", *names]), ""]
        lines += ["Change vs frozen, paired by seed (mean ± std of the per-seed differences):", ""]
        deltas = [
            {"embeddings": labels[key], **{n: _cell(summary[key][n], delta=True) for n in names}}
            for key in shown
            if key != FROZEN
        ]
        if deltas:
            lines += [format_table(deltas, ["embeddings", *names]), ""]
        lines.append(_headline(summary, labels, names, shown))
        comparison = document.get("federated_vs_central", {}).get(task, {})
        if comparison:
            lines += ["", *_federated_lines(comparison, labels, names)]
    timings = document["timings"]
    machine = document["machine"]
    lines += [
        "",
        "## Run",
        "",
        f"- total {timings['total_seconds']:.0f} s; head training by arm "
        f"{timings['head_training_seconds_by_arm']} s (federated: wall time of the Flower runs); "
        f"classifier fits {timings['classifier_seconds_by_name']} s",
        f"- encoder: {document['encoder'].get('source', '?')}",
        f"- machine: {machine['cpu']}, {machine['cpus']} CPUs, load average "
        f"{machine['load_average_1_5_15_min']}, torch {machine['torch']}, {machine['utc']}",
        "- raw per-seed numbers (and each federated run's per-site row counts): the JSON file "
        "beside this one",
    ]
    return "\n".join(lines) + "\n"


def _federated_lines(
    comparison: dict[str, dict[str, Any]], labels: dict[str, str], names: list[str]
) -> list[str]:
    """The federated − central table (paired by seed) and one summary line per federated head."""
    rows: list[dict[str, Any]] = []
    summary: list[str] = []
    for key, refs in comparison.items():
        for arm, stats in refs.items():
            against = "central" if arm == CENTRAL else "matched central"
            rows.append(
                {
                    "federated − reference": f"{labels[key]} − {against}",
                    **{n: _cell(stats["per_classifier"][n], delta=True) for n in names},
                    "all": _cell(stats["all_classifiers"], delta=True),
                }
            )
        parts = [
            f"{'central' if arm == CENTRAL else 'matched'} {_cell(s['all_classifiers'], delta=True)}"
            for arm, s in refs.items()
        ]
        summary.append(f"- {labels[key]}: federated − {', '.join(parts)}")
    return [
        'Federated vs central, paired by seed (F1 differences; "all" = mean over the '
        "classifiers, then mean ± std over seeds):",
        "",
        format_table(rows, ["federated − reference", *names, "all"]),
        "",
        *summary,
    ]


def _counts(counts: dict[str, dict[str, int]]) -> str:
    return "; ".join(
        f"{part} " + ", ".join(f"{name} {value}" for name, value in values.items())
        for part, values in counts.items()
    )


def _headline(
    summary: dict[str, dict[str, dict[str, float]]],
    labels: dict[str, str],
    names: list[str],
    keys: Sequence[str],
) -> str:
    """Best frozen classifier against the best (variant, classifier) cell, by mean F1."""
    frozen_name = max(names, key=lambda n: summary[FROZEN][n]["mean"])
    best_key, best_name = max(
        ((key, n) for key in keys for n in names), key=lambda kn: summary[kn[0]][kn[1]]["mean"]
    )
    return (
        f"Best frozen: {frozen_name} {_cell(summary[FROZEN][frozen_name])}; best overall: "
        f"{labels[best_key]} + {best_name} {_cell(summary[best_key][best_name])}."
    )
