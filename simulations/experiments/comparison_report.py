"""The comparison's multi-seed report: its header, each partition's summary, and the merge of
separate runs' comparison.json files into one report (no training)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from simulations.benchmarks.results import write_results
from simulations.experiments.arms import SELECTION
from simulations.experiments.seed_summary import CHECKED, summarize_seeds, summary_markdown


def report_header(sites: int) -> list[str]:
    return [
        f"# Federated vs centralized vs local ({sites} sites)\n",
        "Each site's held-out split is halved: every trained arm is stopped where its "
        f"validation score ({SELECTION}) is best (each site alone: its own validation half; "
        "centralized: the pooled halves; federated: the round whose checkpoint scores best on "
        "the sites' validation halves) and scored once on the pooled test halves. 'stop' = the "
        "chosen epoch / round out of the budget.\n",
    ]


def summary_section(entries: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], list[str]]:
    """One partition's multi-seed summary and its markdown section (heading and tables)."""
    summary = {"partition": entries[0]["partition"], **summarize_seeds(entries)}
    shown = ", ".join(str(e["run"]["seed"]) for e in entries)
    section = [f"## partition: {summary['partition']}, mean ± sd over seeds {shown}\n"]
    return summary, section + summary_markdown(summary)


def merge_comparisons(sources: Sequence[Path], *, out_dir: Path) -> dict[str, Any]:
    """One report over the seeds of several runs (each ``source``/comparison.json), no training.

    Every run must have the same settings but the seed (same sites, selection rule and
    run-config apart from the partition scheme), and no (partition, seed) may appear twice: seeds
    run in separate sittings then count as one experiment. The per-seed tables and figures stay
    in the sources, so ``out_dir`` may not be one of them; the merged markdown lists each seed's
    ratios and where its tables are.
    """
    if any(out_dir.resolve() == source.resolve() for source in sources):
        raise ConfigError(f"--merge: --out {out_dir} is one of the sources; choose a new directory")
    results: dict[str, Any] = {
        "merged_from": [str(p) for p in sources],
        "machines": {},
        "comparisons": [],
    }
    by_partition: dict[str, list[dict[str, Any]]] = {}
    origin: dict[tuple[str, int], Path] = {}
    reference: tuple[dict[str, Any], Path] | None = None
    for source in sources:
        path = source / "comparison.json"
        loaded = _read_comparison(source)
        for key in ("sites", "selection"):
            if results.setdefault(key, loaded[key]) != loaded[key]:
                raise ConfigError(f"{path}: {key} {loaded[key]!r} differs from {results[key]!r}")
        results["machines"][str(source)] = loaded.get("machine")
        for entry in loaded["comparisons"]:
            scheme, seed = str(entry["partition"]), int(entry["run"]["seed"])
            if (scheme, seed) in origin:
                raise ConfigError(f"{path}: {scheme} seed {seed} is also in {origin[scheme, seed]}")
            if reference is None:
                reference = (entry["run"], path)
            _check_same_run(entry["run"], reference, where=f"{path}: {scheme} seed {seed}")
            by_partition.setdefault(scheme, []).append(entry)
            origin[scheme, seed] = source
            results["comparisons"].append(entry)
    if not by_partition:
        raise ConfigError("--merge: the sources hold no comparison")
    results["seeds"] = sorted({seed for _, seed in origin})
    results["summaries"] = []
    markdown = report_header(int(results["sites"]))
    for scheme, entries in by_partition.items():
        entries.sort(key=lambda e: int(e["run"]["seed"]))
        summary, section = summary_section(entries)
        results["summaries"].append(summary)
        markdown += section
        for entry in entries:
            seed = int(entry["run"]["seed"])
            ratio = entry["federated_over_centralized"]
            shown = ", ".join(f"{k} {ratio[k]:.3f}" for k in CHECKED if k in ratio)
            markdown.append(
                f"- seed {seed}: federated / centralized {shown} "
                f"(tables: {origin[scheme, seed]}/comparison.md)"
            )
        markdown.append("")
    write_results(out_dir, "comparison", results, "\n".join(markdown) + "\n")
    return results


def _read_comparison(source: Path) -> dict[str, Any]:
    """``source``/comparison.json with what a merged report needs; else a ConfigError naming it."""
    import json

    path = source / "comparison.json"
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
        missing = [k for k in ("comparisons", "sites", "selection") if k not in loaded]
        for entry in loaded.get("comparisons", []):
            missing += [k for k in ("partition", *_SUMMARY_KEYS) if k not in entry]
            int(entry["run"]["seed"])  # the seed every report is keyed by
        if missing:  # what a report is rebuilt from, checked here to name the file
            raise KeyError(missing[0])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a readable comparison ({exc!r})") from exc
    return dict(loaded)


# What ``summarize_seeds`` reads from each entry of a comparison.
_SUMMARY_KEYS = ("rows", "federated_over_centralized", "federated_gains")
# Run-config keys that may differ between the seeds of one merged experiment.
_PER_SEED_KEYS = ("seed", "partition", "alpha")


def _check_same_run(
    run: Mapping[str, Any], reference: tuple[Mapping[str, Any], Path], *, where: str
) -> None:
    """Refuse a run-config that differs from ``reference``'s in anything but the seed and scheme."""
    first, first_path = reference
    for key in sorted(set(first) | set(run)):
        if key not in _PER_SEED_KEYS and first.get(key) != run.get(key):
            raise ConfigError(
                f"{where} has run-config {key}={run.get(key)!r}, "
                f"{first_path} has {first.get(key)!r}"
            )
