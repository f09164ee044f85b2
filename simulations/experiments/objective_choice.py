"""Which objective ``auto`` trains, compared on validation halves: `python -m simulations.experiments.objective_choice`.

Reads ``default_vs_frozen --rules`` result directories, one per candidate loss, run on the same
datasets and seeds (so the same data, splits and initialisation: paired by seed), and reports per
dataset:

- **the choice**, on validation only: the validation metrics of the state the default rule keeps
  (the best validation score, the closed-form start a candidate) and the paired difference of each
  candidate from the first one, with its 95% t-interval; the candidate with the higher mean
  validation score is the one the data supports;
- **after the choice**, on test: each candidate's difference from the best tuned frozen baseline
  (issue 15's bar, ``default_vs_frozen.verdict``), to be read once the choice is made; and the
  same for the per-seed choice, the candidate whose kept state scores higher on that seed's
  validation rows (what ``auto`` does with ``registries.AUTO_ALTERNATIVES``).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from common.errors import ConfigError
from common.metrics import format_table
from simulations.benchmarks.results import write_results
from simulations.experiments.default_vs_frozen import CHECKED, RESULT_NAME, same_kind, verdict
from simulations.experiments.entry import add_runs_argument, load_runs
from simulations.experiments.seed_summary import confidence_interval
from simulations.experiments.selection_rules import DEFAULT

VALIDATION = ("R@5", "zs_acc", "zs_auroc", "probe_f1", "score")
"""The validation metrics of a kept state (``common.head_start.validation_scores``)."""
OUT_NAME = "objective_choice"
PER_SEED = "per seed, the higher validation score (what auto does)"


def kept_state(entry: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """One seed's ``(validation metrics, test differences from the best frozen)`` of the state
    the default rule keeps; ConfigError when the run was made without ``--rules``."""
    rule = entry.get("rules", {}).get(DEFAULT)
    if rule is None:
        raise ConfigError(
            f"seed {entry['seed']}: no '{DEFAULT}' record (run default_vs_frozen with --rules)"
        )
    metrics = entry["selections"]["centralized"]["validation_metrics"][rule["step"]]
    return dict(metrics), dict(rule["difference"])


def _paired(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    differences = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    return {
        "mean": float(differences.mean()),
        "ci95": confidence_interval(differences.tolist()),
        "values": differences.tolist(),
    }


def compare_runs(runs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Per dataset present in every run: each candidate's kept validation metrics (means), their
    paired differences from the first candidate, and each candidate's test verdicts."""
    names = list(runs)
    arm, _ = same_kind(list(runs.values()), source="objective choice")
    if arm != "centralized":
        raise ConfigError(f"objective choice reads centralized --rules runs, not {arm} ones")
    datasets = [
        d for d in runs[names[0]]["datasets"] if all(d in r["datasets"] for r in runs.values())
    ]
    if not datasets:
        raise ConfigError("objective choice: no dataset is in every run")
    result: dict[str, Any] = {}
    for dataset in datasets:
        by_seed = {
            name: {e["seed"]: kept_state(e) for e in run["datasets"][dataset]["seeds"]}
            for name, run in runs.items()
        }
        seeds = sorted(set.intersection(*(set(s) for s in by_seed.values())))
        if not seeds:
            raise ConfigError(f"objective choice: {dataset}: no seed is in every run")
        entry: dict[str, Any] = {"seeds": seeds, "candidates": {}}
        for name in names:
            validation = {
                k: [by_seed[name][s][0][k] for s in seeds]
                for k in VALIDATION
                if all(k in by_seed[name][s][0] for s in seeds)
            }
            test = {
                k: verdict([by_seed[name][s][1][k] for s in seeds])
                for k in CHECKED
                if all(k in by_seed[name][s][1] for s in seeds)
            }
            entry["candidates"][name] = {
                "validation": {k: float(np.mean(v)) for k, v in validation.items()},
                "validation_vs_first": {
                    k: _paired([by_seed[names[0]][s][0][k] for s in seeds], v)
                    for k, v in validation.items()
                },
                "test_vs_best_frozen": test,
                "cells_met": sum(v["bar_met"] for v in test.values()),
            }
        entry["choice"] = max(names, key=lambda n: entry["candidates"][n]["validation"]["score"])
        # what auto does in each run: the higher kept validation score (ties: the first)
        picks = {s: _higher(names, [by_seed[n][s][0]["score"] for n in names]) for s in seeds}
        test = {
            k: verdict([by_seed[picks[s]][s][1][k] for s in seeds])
            for k in CHECKED
            if all(k in by_seed[picks[s]][s][1] for s in seeds)
        }
        entry["per_seed_choice"] = {
            "picks": {str(s): n for s, n in picks.items()},
            "test_vs_best_frozen": test,
            "cells_met": sum(v["bar_met"] for v in test.values()),
        }
        result[dataset] = entry
    return result


def _higher(names: Sequence[str], scores: Sequence[float]) -> str:
    return names[int(np.argmax(scores))]


def _ci(d: Mapping[str, Any]) -> str:
    interval = d.get("ci95")
    shown = f"{d['mean']:+.4f}"
    return shown if interval is None else f"{shown} [{interval[0]:+.4f}, {interval[1]:+.4f}]"


def report_markdown(document: Mapping[str, Any]) -> str:
    names = list(document["runs"])
    lines = [
        "# Which objective `auto` trains: compared on validation halves",
        "",
        f"Command: `{document['command']}`",
        "",
        "Runs (`default_vs_frozen --rules`, the same datasets and seeds, paired by seed): "
        + "; ".join(f"`{n}`: {document['runs'][n]['command']}" for n in names),
        "",
        "Per dataset: the validation metrics of the state the default rule keeps (the best "
        "validation score, the closed-form start a candidate), mean over seeds, and each "
        f"candidate minus `{names[0]}` (paired, 95% t-interval); the choice is the higher mean "
        "validation score. Then, on test (read after the choice): each candidate minus the best "
        "tuned frozen baseline, mean [95% CI] and issue 15's bar.",
        "",
        "## Summary",
        "",
    ]
    summary_rows = []
    for dataset, entry in document["datasets"].items():
        row: dict[str, Any] = {"dataset": dataset, "seeds": len(entry["seeds"])}
        for name in names:
            candidate = entry["candidates"][name]
            row[f"{name}: validation score"] = candidate["validation"]["score"]
            row[f"{name}: test cells met"] = (
                f"{candidate['cells_met']}/{len(candidate['test_vs_best_frozen'])}"
            )
        per_seed = entry["per_seed_choice"]
        row["chosen on validation"] = entry["choice"]
        row[PER_SEED + ": test cells met"] = (
            f"{per_seed['cells_met']}/{len(per_seed['test_vs_best_frozen'])}"
        )
        summary_rows.append(row)
    lines.append(format_table(summary_rows, list(summary_rows[0])))
    for dataset, entry in document["datasets"].items():
        lines += [
            "",
            f"## {dataset}",
            "",
            f"Seeds {entry['seeds']}.",
            "",
            "Validation (the choice):",
            "",
        ]
        rows = []
        for name in names:
            candidate = entry["candidates"][name]
            row = {"loss": name}
            for k, v in candidate["validation"].items():
                shown = f"{v:.4f}"
                if name != names[0]:
                    shown += f" ({_ci(candidate['validation_vs_first'][k])})"
                row[k] = shown
            rows.append(row)
        lines.append(format_table(rows, ["loss", *VALIDATION]))
        lines += ["", "Test, minus the best tuned frozen baseline (after the choice):", ""]
        rows = []
        choices = {n: entry["candidates"][n]["test_vs_best_frozen"] for n in names}
        choices[PER_SEED] = entry["per_seed_choice"]["test_vs_best_frozen"]
        for name, tests in choices.items():
            row = {"loss": name}
            for k, v in tests.items():
                met = "yes" if v["bar_met"] else ("holds, < 5 seeds" if v["holds"] else "NO")
                row[k] = f"{_ci(v)} {met}"
            rows.append(row)
        lines.append(format_table(rows, ["loss", *CHECKED]))
        picks = entry["per_seed_choice"]["picks"]
        lines += [
            "",
            "Per seed, the objective with the higher kept validation score: "
            + ", ".join(f"{s} {n}" for s, n in picks.items())
            + ".",
        ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_runs_argument(parser, name="LOSS", what="its default_vs_frozen --rules result directory")
    args = parser.parse_args(argv)
    runs = load_runs(args.runs, RESULT_NAME)
    command = "python -m simulations.experiments.objective_choice " + " ".join(
        argv if argv is not None else __import__("sys").argv[1:]
    )
    document = {
        "command": command.strip(),
        "runs": {
            n: {"command": r["command"], "directory": s.partition("=")[2]}
            for (n, r), s in zip(runs.items(), args.runs, strict=True)
        },
        "datasets": compare_runs(runs),
    }
    write_results(args.out, OUT_NAME, document, report_markdown(document))
    print(report_markdown(document))


if __name__ == "__main__":
    from simulations.experiments.entry import run_main

    run_main("objective_choice", main)
