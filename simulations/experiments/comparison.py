"""Should we federate? Frozen vs each site alone vs centralized vs federated (with and without DP), same splits, same evaluation."""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.config import RunSettings
from common.errors import ConfigError
from common.metrics import (
    format_table,
)
from common.training import HeadModel
from simulations.benchmarks.results import RESULTS_DIR, write_results
from simulations.cli.paths import run_config_paths, user_path
from simulations.experiments.arms import (
    HEADLINE,
    PRIVACY_COLUMNS,
    SAMPLE_DP_LOSS,
    SELECTION,
    CommonTest,
    concat_embedded,
    federate,
    frozen_row,
    metric_row,
    prepare_sites,
    ridge_selection,
    run_config_of,
    select_round,
    split_holdout,
    train_selected,
)
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
# The metric a figure shows: the first of these the rows have (paired data: retrieval).
PRIMARY = ("mean_R@5", "probe_f1_macro", "zs_acc")
# Datasets whose coordinator-held evaluation set (another seed of the generator) shares no example
# with the sites' data; for the others the round curves come from the sites' own held-out splits.
DISJOINT_SERVER_EVAL = ("synthetic-radiology",)


@dataclass(frozen=True)
class PrivacyArms:
    """Stated parameters of the two DP arms.

    Sample-level (DP-SGD at every site, Opacus): each site calibrates its noise so the whole run
    costs at most ``target_epsilon`` at ``delta`` for any one of its examples. Client-level
    (Flower's fixed clipping + Gaussian noise on the mean update): ``noise_multiplier`` and
    ``clipping_norm`` fixed; the epsilon that protects a whole site follows from them.
    """

    target_epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    client_mode: str = "client-side"
    noise_multiplier: float = 1.0
    clipping_norm: float = 0.1
    client_delta: float = 1e-5

    def sample_config(self) -> dict[str, Any]:
        """Run-config of the sample-level arm (the run's other settings still apply)."""
        from client.privacy import PrivacySettings, require_sample_level_dp

        require_sample_level_dp(SAMPLE_DP_LOSS)
        values = {
            "loss": SAMPLE_DP_LOSS,
            "dp-target-epsilon": self.target_epsilon,
            "dp-delta": self.delta,
            "dp-max-grad-norm": self.max_grad_norm,
        }
        PrivacySettings.from_config(values)  # ConfigError naming the bad dp-* value
        return values

    def client_config(self) -> dict[str, Any]:
        """Run-config of the client-level arm."""
        return {
            "client-dp": self.client_mode,
            "client-dp-noise-multiplier": self.noise_multiplier,
            "client-dp-clipping-norm": self.clipping_norm,
            "client-dp-delta": self.client_delta,
        }


@dataclass
class Comparison:
    """Rows of one comparison (one partition scheme) and the settings that produced them.

    ``histories``: each federated arm's per-round history (history.jsonl); ``per_site``: for each
    site, each method's metrics on that site's own test half; ``selections``: each trained arm's
    validation score per epoch step / round and the chosen stopping point (``Selection``);
    ``sizes``: each site's train / validation / test rows and the scored test set's
    (``test_ids``).
    """

    partition: str
    sites: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    histories: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    per_site: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    privacy: dict[str, Any] | None = None
    selections: dict[str, dict[str, Any]] = field(default_factory=dict)
    sizes: dict[str, dict[str, int]] = field(default_factory=dict)
    test_ids: list[str] = field(default_factory=list)

    def table(self) -> str:
        shown = [*PRIVACY_COLUMNS, *HEADLINE, "stop"]
        return format_table(self.rows, ["method", *[c for c in shown if self.has(c)]])

    def has(self, column: str) -> bool:
        return any(column in r for r in self.rows)

    @property
    def primary(self) -> str:
        return next((m for m in PRIMARY if self.has(m)), HEADLINE[0])

    def per_site_table(self) -> str:
        metric = self.primary
        methods: list[str] = []
        for values in self.per_site.values():
            methods.extend(m for m in values if m not in methods)
        rows = [
            {"method": m, **{s: v[m].get(metric) for s, v in self.per_site.items() if m in v}}
            for m in methods
        ]
        return format_table(rows, ["method", *self.per_site])


def compare(
    *,
    run: RunSettings,
    sites: int,
    out_dir: Path,
    federated: bool = True,
    privacy: PrivacyArms | None = None,
    echo: bool = False,
    cache_dir: Path | None = None,
    common_test: CommonTest | None = None,
) -> Comparison:
    """Run every method on the run's dataset split over ``sites`` sites (partition from ``run``).

    Every site's held-out split is halved (``split_holdout``): every trained arm picks its
    stopping point on validation data only (``SELECTION``; each site alone on its own validation
    half, centralized on the pooled halves, each federated arm by the round whose checkpoint
    scores best on the sites' validation halves) and is scored once on the pooled test halves.
    ``privacy`` adds the two DP arms (and, when the run's loss is not the proxy loss, the
    non-private federated proxy-loss run the sample-level arm must be read against).
    ``cache_dir``: the embedding cache (default ``out_dir``/cache; shareable between comparisons).
    ``common_test``: score every arm on this set instead (its rows in no site's data, which needs
    ``run.test_rows == "exclude"``); each site's whole held-out split is then its validation
    split, and the per-site table scores each site's own rows of the set.
    """
    import torch

    torch.set_num_threads(2)
    out_dir.mkdir(parents=True, exist_ok=True)
    comparison = Comparison(
        partition=f"{run.partition}"
        + (f"(alpha={run.alpha})" if run.partition == "dirichlet" else ""),
        sites=sites,
    )
    started = time.perf_counter()
    cache_dir = cache_dir or out_dir / "cache"
    prepared = prepare_sites(run, sites, cache_dir=cache_dir)
    if common_test is None:
        splits = [split_holdout(s) for s in prepared]
        pooled_test = concat_embedded([s.test for s in splits])
    else:
        own = common_test.site_tests(run, prepared)
        splits = [split_holdout(s, own_test=t) for s, t in zip(prepared, own, strict=True)]
        pooled_test = common_test.data
    comparison.seconds["embedding"] = time.perf_counter() - started
    comparison.sizes = {
        f"site {i}": {"train": len(s.train), "validation": len(s.val), "test": len(s.test)}
        for i, s in enumerate(splits)
    }
    comparison.sizes["scored"] = {"test": len(pooled_test)}
    comparison.test_ids = list(pooled_test.ids)
    pooled_train = concat_embedded([s.train for s in splits])
    pooled_val = concat_embedded([s.val for s in splits])
    frozen, frozen_sel = frozen_row(
        "frozen (+ closed-form lstsq alignment)", pooled_train, pooled_val, pooled_test
    )
    comparison.rows.append(frozen)
    steps = run.num_server_rounds

    started = time.perf_counter()
    local = [train_selected(run, s.train, s.val, steps=steps) for s in splits]
    local_rows = [
        {**metric_row(f"site {i} alone", m, s.train, pooled_test), "stop": sel.label}
        for i, ((m, sel), s) in enumerate(zip(local, splits, strict=True))
    ]
    comparison.seconds["local"] = time.perf_counter() - started
    chosen = [sel.chosen * sel.per_step for _, sel in local]
    average: dict[str, Any] = {
        "method": "each site alone (mean)",
        "stop": f"epoch {min(chosen)}-{max(chosen)}/{steps * run.local_epochs}",
    }
    for key in HEADLINE:
        values = [r[key] for r in local_rows if key in r]
        if values:
            average[key] = float(np.mean(values))
    comparison.rows.append(average)

    started = time.perf_counter()
    central, central_sel = train_selected(run, pooled_train, pooled_val, steps=steps)
    comparison.rows.append(
        {
            **metric_row("centralized (pooled, upper bound)", central, pooled_train, pooled_test),
            "stop": central_sel.label,
        }
    )
    comparison.seconds["centralized"] = time.perf_counter() - started
    models: dict[str, HeadModel] = {"centralized": central}
    comparison.selections = {
        **({"frozen": ridge_selection(frozen_sel)} if frozen_sel else {}),
        **{f"site {i} alone": sel.to_dict() for i, (_, sel) in enumerate(local)},
        "centralized": central_sel.to_dict(),
    }

    arms = _arm_configs(run, federated=federated, privacy=privacy)
    if privacy is not None:
        comparison.privacy = asdict(privacy)
    for key, (label, config) in arms.items():
        started = time.perf_counter()
        arm = federate(
            label=label,
            run_config=config,
            sites=sites,
            home=out_dir / "arms" / key,
            cache_dir=cache_dir,
            echo=echo,
        )
        assert arm.run_dir is not None
        model, selection = select_round(arm.run_dir, arm.model, [s.val for s in splits])
        comparison.seconds[key] = time.perf_counter() - started
        comparison.histories[label] = arm.history
        comparison.selections[label] = selection.to_dict()
        row = {**metric_row(label, model, pooled_train, pooled_test), "stop": selection.label}
        if arm.privacy:
            row = {"method": label, "epsilon": arm.privacy["epsilon"], **row, **arm.privacy}
        comparison.rows.append(row)
        models[label] = model
    comparison.rows.extend({**r, "method": f"  {r['method']}"} for r in local_rows)

    started = time.perf_counter()
    for i, s in enumerate(splits):
        if not len(s.test):
            continue  # a common test set with no rows of this site
        mine = {"this site alone": local[i][0], **models}
        comparison.per_site[f"site {i}"] = {
            method: metric_row(method, model, s.train, s.test) for method, model in mine.items()
        }
    comparison.seconds["per_site_evaluation"] = time.perf_counter() - started
    return comparison


def _arm_configs(
    run: RunSettings, *, federated: bool, privacy: PrivacyArms | None
) -> dict[str, tuple[str, dict[str, Any]]]:
    """Federated arms to run: key (its directory) -> (row label, run-config)."""
    if not federated:
        if privacy is not None:
            raise ConfigError("the DP arms are federated runs: drop --no-federated or add --no-dp")
        return {}
    base = run_config_of(run)
    if run.dataset in DISJOINT_SERVER_EVAL and not run.server_eval:
        base["server-eval"] = run.dataset  # per-round held-out curve on data no site holds
    rounds = run.num_server_rounds
    arms = {"federated": (f"federated ({run.strategy}, {rounds} rounds)", base)}
    if privacy is None:
        return arms
    if run.loss != SAMPLE_DP_LOSS:
        arms["federated-proxy"] = (
            f"federated, {SAMPLE_DP_LOSS} loss (no DP: the sample-level arm's baseline)",
            {**base, "loss": SAMPLE_DP_LOSS},
        )
    arms["sample-dp"] = (
        f"federated + sample-level DP ({SAMPLE_DP_LOSS} loss, target ε={privacy.target_epsilon:g} per site)",
        {**base, **privacy.sample_config()},
    )
    arms["client-dp"] = (
        f"federated + client-level DP ({run.loss} loss, σ={privacy.noise_multiplier:g}, C={privacy.clipping_norm:g})",
        {**base, **privacy.client_config()},
    )
    for _, config in arms.values():
        RunSettings.from_run_config(config)  # a bad arm fails before any arm runs
    return arms


def _by_name(comparison: Comparison) -> dict[str, dict[str, Any]]:
    """Rows keyed by the method's name before its parenthesis ("frozen", "centralized", ...)."""
    return {r["method"].strip().split(" (")[0]: r for r in comparison.rows}


def ratios(comparison: Comparison) -> dict[str, float]:
    """Federated / centralized for each headline metric (the issue's acceptance ratios)."""
    rows = _by_name(comparison)
    if "federated" not in rows:
        return {}
    fed, central = rows["federated"], rows["centralized"]
    return {
        k: fed[k] / central[k] for k in HEADLINE if k in fed and k in central and central[k] > 0
    }


def gains(comparison: Comparison) -> dict[str, dict[str, float]]:
    """Federated minus the frozen embeddings and minus the mean site alone, per headline metric."""
    rows = _by_name(comparison)
    if "federated" not in rows:
        return {}
    fed = rows["federated"]
    return {
        name: {k: fed[k] - rows[base][k] for k in HEADLINE if k in fed and k in rows[base]}
        for name, base in (("minus_frozen", "frozen"), ("minus_alone", "each site alone"))
    }


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
    import sys

    from common.errors import FedEmbedError

    try:
        main()
    except FedEmbedError as exc:  # a bad setting or a failed federated arm: one line, exit 2
        print(f"experiment: error: {exc}", file=sys.stderr)
        sys.exit(2)
