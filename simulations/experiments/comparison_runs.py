"""Run comparisons over partition schemes and seeds and write the committed report: `python -m simulations.experiments.comparison_runs`.

One comparison (frozen vs each site alone vs centralized vs federated, with and without DP) is
`simulations.experiments.comparison.compare`; this module loops it over seeds and partitions, writes
JSON, markdown and figures, merges sittings and redraws figures.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.config import RunSettings
from common.errors import ConfigError
from simulations.benchmarks.results import RESULTS_DIR, write_results
from simulations.cli.paths import run_config_paths, user_path
from simulations.experiments.arms import (
    SELECTION,
)
from simulations.experiments.comparison import Comparison, PrivacyArms, compare, gains, ratios
from simulations.experiments.comparison_figures import plot_comparison
from simulations.experiments.comparison_report import (
    merge_comparisons,
    report_header,
    summary_section,
)
from simulations.experiments.machine import machine_info
from simulations.flower.run_config import parse_run_config

DEFAULT_OUT = RESULTS_DIR / "federated"
# The committed comparisons' shape: more, shorter rounds than RunSettings' defaults.
SITES, ROUNDS, LOCAL_EPOCHS = 4, 30, 2


def replot(out_dir: Path) -> list[Path]:
    """Redraw the figures of ``out_dir``/comparison.json (each partition's first seed), no training."""
    import json

    results = json.loads((out_dir / "comparison.json").read_text(encoding="utf-8"))
    written: list[Path] = []
    seen: set[str] = set()
    for entry in results["comparisons"]:
        scheme = str(entry["run"]["partition"])
        if scheme in seen:
            continue
        seen.add(scheme)
        comparison = Comparison(
            partition=entry["partition"],
            sites=int(results["sites"]),
            rows=entry["rows"],
            histories=entry["histories"],
            round_test=entry.get("round_test", {}),
            per_site=entry["per_site"],
            privacy=entry["privacy_arms"],
            selections=entry.get("selections", {}),
        )
        written += plot_comparison(comparison, out_dir, prefix=scheme)
    return written


# The comparison's run-config defaults, chosen on VALIDATION scores only (README "Should we
# federate?"); --set overrides them.
COMPARISON_DEFAULTS: dict[str, Any] = {}


def run_comparisons(
    *,
    out_dir: Path,
    work_dir: Path,
    sites: int = 4,
    partitions: Sequence[tuple[str, float]] = (("iid", 0.5), ("dirichlet", 0.3)),
    overrides: dict[str, Any] | None = None,
    federated: bool = True,
    privacy: PrivacyArms | None = None,
    seeds: Sequence[int] = (0,),
    dp_seeds: Sequence[int] | None = None,
    echo: bool = False,
) -> dict[str, Any]:
    """One comparison per partition scheme and seed; results JSON, markdown and PNGs in ``out_dir``.

    A seed fixes the data (generation, partition, splits), the heads' initialisation and the
    shuffling of every arm alike. The DP arms run for ``dp_seeds`` (default: every seed). Figures
    are drawn for each partition's first seed. Caches and runs go to ``work_dir``.
    """
    dp_seeds = list(seeds) if dp_seeds is None else list(dp_seeds)
    results: dict[str, Any] = {
        "machine": machine_info(),
        "sites": sites,
        "seeds": list(seeds),
        "selection": SELECTION,
        "comparisons": [],
        "summaries": [],
    }
    markdown = report_header(sites)
    out_dir.mkdir(parents=True, exist_ok=True)
    done: list[str] = []
    for scheme, alpha in partitions:
        entries: list[dict[str, Any]] = []
        details: list[str] = []
        for seed in seeds:
            settings = {
                "partition": scheme,
                "alpha": alpha,
                "min-sites": sites,
                **(overrides or {}),
                "seed": seed,
            }
            run = RunSettings.from_run_config(settings)
            comparison = compare(
                run=run,
                sites=sites,
                out_dir=work_dir / scheme / f"seed-{seed}",
                federated=federated,
                privacy=privacy if seed in dp_seeds else None,
                echo=echo,
                cache_dir=work_dir / "cache",
            )
            figures = (
                plot_comparison(comparison, out_dir, prefix=scheme) if seed == seeds[0] else []
            )
            entry = _entry(comparison, run, figures)
            entries.append(entry)
            details += _detail_markdown(comparison, entry, seed, figures)
            results["comparisons"].append(entry)
            summary, section = summary_section(entries)
            section += details
            # Written after every seed: a long run that stops early keeps what it finished.
            write_results(
                out_dir,
                "comparison",
                {**results, "summaries": [*results["summaries"], summary]},
                "\n".join([*markdown, *done, *section]) + "\n",
            )
        results["summaries"].append(summary)
        done += section
    return results


def _entry(comparison: Comparison, run: RunSettings, figures: Sequence[Path]) -> dict[str, Any]:
    return {
        "partition": comparison.partition,
        "run": run.to_dict(),
        "privacy_arms": comparison.privacy,
        "rows": comparison.rows,
        "federated_over_centralized": ratios(comparison),
        "federated_gains": gains(comparison),
        "selections": comparison.selections,
        "per_site": comparison.per_site,
        "histories": comparison.histories,
        "round_test": comparison.round_test,
        "figures": [p.name for p in figures],
        "seconds": comparison.seconds,
    }


def _detail_markdown(
    comparison: Comparison, entry: Mapping[str, Any], seed: int, figures: Sequence[Path]
) -> list[str]:
    lines = [f"### {comparison.partition}, seed {seed}\n", comparison.table(), ""]
    if entry["federated_over_centralized"]:
        shown = ", ".join(f"{k} {v:.3f}" for k, v in entry["federated_over_centralized"].items())
        lines.append(f"federated / centralized: {shown}\n")
    if comparison.has("epsilon"):
        lines.append(_privacy_note(comparison) + "\n")
    if comparison.per_site:
        lines += [
            f"{comparison.primary} on each site's own test half:\n",
            comparison.per_site_table(),
            "",
        ]
    return lines + [f"![{p.stem}]({p.name})" for p in figures] + [""]


def _privacy_note(comparison: Comparison) -> str:
    parts = []
    for row in comparison.rows:
        if row.get("privacy") == "sample-level":
            parts.append(
                f"sample-level: ε={row['epsilon']:.3g} at δ={row['delta']:g} is the largest any site's "
                "Opacus RDP accountant reports for the whole run (one example's influence)"
            )
        elif row.get("privacy") == "client-level":
            parts.append(
                f"client-level: ε={row['epsilon']:.3g} at δ={row['delta']:g} from Flower's RdpAccountant "
                f"after {row['releases']} releases (one whole site's influence, no sampling amplification)"
            )
    return "epsilon: " + "; ".join(parts) + "."


def main(argv: Sequence[str] | None = None) -> None:
    defaults = PrivacyArms()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--out",
        default=None,
        type=user_path,
        help="results directory (JSON + markdown + PNGs; default docs/results/federated, which --merge "
        "does not take)",
    )
    parser.add_argument(
        "--work",
        default="runs/experiment",
        type=user_path,
        help="caches, site state and Flower runs",
    )
    parser.add_argument("--sites", type=int, default=SITES)
    parser.add_argument("--n", type=int, default=RunSettings().dataset_n, help="pooled examples")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--local-epochs", type=int, default=LOCAL_EPOCHS)
    parser.add_argument(
        "--seeds", default="0", help="comma-separated seeds (data, init, shuffling); e.g. 0,1,2"
    )
    parser.add_argument(
        "--dp-seeds", default=None, help="seeds that also run the DP arms (default: all --seeds)"
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="run-config overrides for every arm, TOML values as in `flwr run --run-config` "
        f'(strings quoted: loss="supcon"; defaults: {_defaults_text()})',
    )
    parser.add_argument(
        "--partitions",
        default="iid:0.5,dirichlet:0.3",
        help="comma-separated scheme:alpha pairs",
    )
    parser.add_argument(
        "--no-federated", action="store_true", help="skip the Flower runs (baselines only)"
    )
    parser.add_argument("--no-dp", action="store_true", help="skip the two DP arms")
    parser.add_argument(
        "--replot", action="store_true", help="only redraw the figures of --out/comparison.json"
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="DIR",
        help="no training: one report in --out over the seeds of earlier runs' result directories",
    )
    parser.add_argument("--dp-target-epsilon", type=float, default=defaults.target_epsilon)
    parser.add_argument("--dp-delta", type=float, default=defaults.delta)
    parser.add_argument("--dp-max-grad-norm", type=float, default=defaults.max_grad_norm)
    parser.add_argument(
        "--client-dp-noise-multiplier", type=float, default=defaults.noise_multiplier
    )
    parser.add_argument("--client-dp-clipping-norm", type=float, default=defaults.clipping_norm)
    parser.add_argument("--client-dp-delta", type=float, default=defaults.client_delta)
    args = parser.parse_args(argv)
    if args.merge and args.out is None:
        raise ConfigError("--merge: name the merged report's directory with --out")
    out = Path(args.out or DEFAULT_OUT)
    if args.replot:
        for path in replot(out):
            print(path)
        return
    if args.merge:
        merge_comparisons([Path(d) for d in args.merge], out_dir=out)
        print((out / "comparison.md").read_text())
        return
    overrides = {
        **COMPARISON_DEFAULTS,
        "dataset-n": args.n,
        "num-server-rounds": args.rounds,
        "local-epochs": args.local_epochs,
        **run_config_paths(parse_run_config(" ".join(args.set), option="--set"), option="--set"),
    }
    seeds = _ints(args.seeds, "--seeds")
    dp_seeds = seeds if args.dp_seeds is None else _ints(args.dp_seeds, "--dp-seeds")
    privacy = (
        None
        if args.no_dp or args.no_federated
        else PrivacyArms(
            target_epsilon=args.dp_target_epsilon,
            delta=args.dp_delta,
            max_grad_norm=args.dp_max_grad_norm,
            noise_multiplier=args.client_dp_noise_multiplier,
            clipping_norm=args.client_dp_clipping_norm,
            client_delta=args.client_dp_delta,
        )
    )
    run_comparisons(
        out_dir=out,
        work_dir=Path(args.work),
        sites=args.sites,
        partitions=_partitions(args.partitions),
        overrides=overrides,
        federated=not args.no_federated,
        privacy=privacy,
        seeds=seeds,
        dp_seeds=dp_seeds,
    )
    print((out / "comparison.md").read_text())


def _defaults_text() -> str:
    return " ".join(f"{k}={v}" for k, v in COMPARISON_DEFAULTS.items()) or "none"


def _ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ConfigError(f"{option}: '{text}' is not a comma-separated list of integers") from exc
    if not values:
        raise ConfigError(f"{option}: no seed given")
    return values


def _partitions(text: str) -> list[tuple[str, float]]:
    out = []
    for item in text.split(","):
        scheme, _, alpha = item.strip().partition(":")
        try:
            out.append((scheme, float(alpha or 0.5)))
        except ValueError as exc:
            raise ConfigError(f"--partitions: '{item}' is not scheme:alpha") from exc
    return out


if __name__ == "__main__":
    from simulations.experiments.entry import run_main

    run_main("comparison_runs", main)
