"""Two federations compared seed by seed: `python -m simulations.experiments.federated_pairs`.

Reads ``comparison_runs`` result directories made on the same partitions and seeds with one
difference in the run-config (e.g. ``--set 'ntd-beta=1.0'``); the first is the reference. For each
other run and partition it reports the paired difference of the federated arm (other minus
reference) with its 95% t-interval over the seeds both hold:

- **on validation** (what a choice may be made on): the best validation score over the rounds
  (the round the run keeps) and the mean validation score of the rounds after ``LATE_FROM``
  (drift: what a federation forgets in its later rounds);
- **on test** (read once a choice is made): each headline metric of the kept round, and the
  federated / pooled ratio of R@5 and AUROC;
- the federated arm's seconds.

The arms a federation's settings cannot change (the frozen baseline, the pooled run) must score
the same in both runs; where they do not, the report says so (the runs are not paired).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from common.errors import ConfigError
from common.metrics import format_table
from simulations.benchmarks.results import write_results
from simulations.experiments.arms import HEADLINE
from simulations.experiments.entry import add_runs_argument, load_runs
from simulations.experiments.seed_summary import confidence_interval

RESULT_NAME = "comparison"
OUT_NAME = "federated_pairs"
LATE_FROM = 11
"""The first round of the "late" validation mean (1-based)."""
RATIOS = ("mean_R@5", "zs_auroc")
UNCHANGED = ("frozen", "centralized")
"""Method-name prefixes of the rows a federation's run-config cannot change."""


def by_seed(document: Mapping[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    """``(partition, seed) -> comparison entry`` of a comparison_runs result document."""
    return {(c["partition"], int(c["run"]["seed"])): c for c in document["comparisons"]}


def _row(entry: Mapping[str, Any], prefix: str) -> dict[str, float]:
    for row in entry["rows"]:
        if row["method"].startswith(prefix):
            return {k: float(row[k]) for k in HEADLINE if k in row}
    raise ConfigError(f"seed {entry['run']['seed']}: no {prefix!r} row")


def federated_record(entry: Mapping[str, Any]) -> dict[str, float]:
    """One seed's federated numbers: validation (best, late mean), test metrics, ratios, seconds."""
    selection = next(v for k, v in entry["selections"].items() if k.startswith("federated"))
    scores = [float(s) for s in selection["validation_scores"]]
    late = scores[LATE_FROM - 1 :] or scores[-1:]
    record = {"validation best": max(scores), "validation late mean": float(np.mean(late))}
    test, pooled = _row(entry, "federated"), _row(entry, "centralized")
    record.update({f"test {k}": v for k, v in test.items()})
    record.update({f"federated / pooled {k}": test[k] / pooled[k] for k in RATIOS if pooled[k]})
    record["federated seconds"] = float(entry["seconds"]["federated"])
    return record


def _settings_difference(reference: Mapping[str, Any], other: Mapping[str, Any]) -> str:
    changed = [
        f"{k}={other.get(k)!r} (reference {reference.get(k)!r})"
        for k in sorted(set(reference) | set(other))
        if reference.get(k) != other.get(k) and k != "seed"
    ]
    return ", ".join(changed) or "none"


def compare(
    reference: Mapping[tuple[str, int], Mapping[str, Any]],
    other: Mapping[tuple[str, int], Mapping[str, Any]],
) -> dict[str, Any]:
    """Per partition: the seeds both runs hold, the paired differences and the unchanged arms'
    check."""
    partitions: dict[str, Any] = {}
    for partition in sorted({p for p, _ in reference} & {p for p, _ in other}):
        seeds = sorted(s for p, s in reference if p == partition and (p, s) in other)
        pairs = [(reference[(partition, s)], other[(partition, s)]) for s in seeds]
        records = [(federated_record(a), federated_record(b)) for a, b in pairs]
        differences: dict[str, Any] = {}
        for key in records[0][0]:
            values = [b[key] - a[key] for a, b in records if key in a and key in b]
            differences[key] = {
                "mean": float(np.mean(values)),
                "ci95": confidence_interval(values),
                "values": values,
                "higher": sum(v > 0 for v in values),
            }
        mismatched = [
            f"seed {s}: {prefix}"
            for s, (a, b) in zip(seeds, pairs, strict=True)
            for prefix in UNCHANGED
            if _row(a, prefix) != _row(b, prefix)
        ]
        partitions[partition] = {
            "seeds": seeds,
            "settings": _settings_difference(pairs[0][0]["run"], pairs[0][1]["run"]),
            "reference": {k: [a[k] for a, _ in records] for k in records[0][0]},
            "differences": differences,
            "unchanged_arms_differ": mismatched,
        }
    if not partitions:
        raise ConfigError("--runs: the runs share no partition")
    return partitions


def _interval(stats: Mapping[str, Any]) -> str:
    ci = stats["ci95"]
    return "-" if ci is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def report_markdown(document: Mapping[str, Any]) -> str:
    lines = [
        "# Federated arm, paired by seed",
        "",
        f"Command: `{document['command']}`",
        "",
        "Differences are the other run minus the reference, per seed; 95% t-intervals over the "
        "seeds. Validation rows choose; test rows are read after the choice.",
    ]
    for name, comparison in document["comparisons"].items():
        for partition, result in comparison.items():
            lines += ["", f"## {name} vs {document['reference']}: {partition}", ""]
            lines += [
                f"- seeds: {', '.join(map(str, result['seeds']))}",
                f"- run-config difference: {result['settings']}",
            ]
            if result["unchanged_arms_differ"]:
                lines.append(
                    "- NOT PAIRED: arms the change cannot touch differ: "
                    + "; ".join(result["unchanged_arms_differ"])
                )
            rows = []
            for key, stats in result["differences"].items():
                reference = float(np.mean(result["reference"][key]))
                rows.append(
                    {
                        "quantity": key,
                        "reference mean": f"{reference:.4f}",
                        "difference": f"{stats['mean']:+.4f}",
                        "95% CI": _interval(stats),
                        "higher on": f"{stats['higher']}/{len(stats['values'])}",
                        "per seed": ", ".join(f"{v:+.3f}" for v in stats["values"]),
                    }
                )
            lines += ["", format_table(rows, list(rows[0]))]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_runs_argument(parser, name="NAME", what="a comparison_runs result directory")
    args = parser.parse_args(argv)
    runs = {name: by_seed(document) for name, document in load_runs(args.runs, RESULT_NAME).items()}
    if len(runs) < 2:
        raise ConfigError("--runs: name a reference and at least one other run")
    reference, *others = runs
    command = "python -m simulations.experiments.federated_pairs " + " ".join(
        argv if argv is not None else __import__("sys").argv[1:]
    )
    document = {
        "command": command.strip(),
        "reference": reference,
        "comparisons": {name: compare(runs[reference], runs[name]) for name in others},
    }
    write_results(args.out, OUT_NAME, document, report_markdown(document))
    print(report_markdown(document))


if __name__ == "__main__":
    from simulations.experiments.entry import run_main

    run_main("federated_pairs", main)
