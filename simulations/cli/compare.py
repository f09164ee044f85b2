"""`fedembed compare`: should we federate? Every arm of the comparison, on a consortium's own data.

A manifest (CSV or JSONL: image and/or text, label, site and split columns) is split over
simulated sites by its site column (or at random, or with Dirichlet label skew). The frozen
encoders, each site alone, all sites pooled and a real Flower federation are scored on one test
set: the rows marked split=test (pooled over the sites, which never see them), every row of
--test-data, or, with neither, half of each site's held-out rows as in `fedembed demo`. Every
arm stops on validation rows only. The data are checked before any encoder loads.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from common.config import LOSSES, RunSettings, SiteSettings
from common.data.manifest import DEFAULT_COLUMNS
from common.embedding import EmbeddedDataset
from simulations.cli.compare_plan import (
    DEFAULT_OUT,
    SCHEMES,
    SINGLE_MODALITY_LOSS,
    TEST,
    Plan,
    plan_comparison,
)
from simulations.cli.paths import dataset_option, user_encoder, user_path

if TYPE_CHECKING:  # these import torch: only once the checks have passed
    from simulations.experiments.arms import CommonTest
    from simulations.experiments.comparison import Comparison


def register_compare(sub: Any) -> None:
    from simulations.experiments.demo import ROUNDS, TRAINING

    defaults = RunSettings()
    p = sub.add_parser(
        "compare",
        help="should we federate? frozen vs each site alone vs pooled vs federated, on your manifest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data",
        required=True,
        type=dataset_option("--data"),
        help="CSV/JSONL manifest: image and/or text columns, optional label, site and split "
        f"(train/{TEST}) columns; classes from <manifest>.classes.json",
    )
    p.add_argument(
        "--test-data",
        default=None,
        type=dataset_option("--test-data"),
        help="a manifest whose every row is the common test set (same modalities and classes; "
        f"instead of rows marked {DEFAULT_COLUMNS['split']}={TEST} in --data)",
    )
    p.add_argument(
        "--partition",
        choices=SCHEMES,
        default="site",
        help="site: one site per value of the site column; iid: rows at random; dirichlet: "
        "label skew (default: %(default)s)",
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=defaults.alpha,
        help="Dirichlet concentration, --partition dirichlet (default: %(default)s)",
    )
    p.add_argument(
        "--sites",
        type=int,
        default=None,
        help="number of sites (default: the site column's distinct values; with --partition "
        "site it must equal them; required for iid/dirichlet without a site column)",
    )
    p.add_argument(
        "--rounds", type=int, default=ROUNDS, help="federated rounds (default: %(default)s)"
    )
    p.add_argument(
        "--local-epochs",
        type=int,
        default=TRAINING["local-epochs"],
        help="epochs per round at each site (default: %(default)s)",
    )
    p.add_argument(
        "--loss",
        choices=list(LOSSES),
        default=None,
        help=f"default: {TRAINING['loss']} for labelled image-text pairs (the demo's), "
        f"{defaults.loss} for unlabelled pairs, {SINGLE_MODALITY_LOSS} for labelled "
        "single-modality data",
    )
    p.add_argument(
        "--image-encoder",
        default=defaults.image_encoder,
        type=user_encoder,
        help="packaged name, Hugging Face id or model directory; 'none' skips images "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--text-encoder",
        default=defaults.text_encoder,
        type=user_encoder,
        help="packaged name, Hugging Face id or model directory; 'none' skips texts "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="partition, initialisation and shuffling seed (default: %(default)s)",
    )
    p.add_argument(
        "--out",
        default=DEFAULT_OUT,
        type=user_path,
        help="results (results.json, results.md, figures) and the Flower runs (default: %(default)s)",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        type=user_path,
        help="embedding cache (default: $FEDEMBED_HOME/cache, the one `fedembed embed` fills)",
    )
    p.add_argument(
        "--run-config",
        default=None,
        help="other run-config keys, as flwr run takes them: 'strategy=\"fedprox\" batch-size=32'",
    )
    p.add_argument(
        "--no-federated", action="store_true", help="skip the Flower run (baselines only)"
    )
    p.add_argument(
        "--check", action="store_true", help="check the data and print the plan; train nothing"
    )
    p.add_argument(
        "--verbose-flower", action="store_true", help="stream Flower's run log to the terminal"
    )
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    """Check everything, print the plan, then run every arm and print and save the results."""
    plan = plan_comparison(args)
    print("\n".join(plan.describe()))
    if args.check:
        print("check passed: nothing trained (run again without --check)")
        return 0
    run_plan(plan)
    return 0


def run_plan(plan: Plan) -> None:
    """Embed the common test set, run every arm (compare), then print and save the results."""
    from simulations.experiments.comparison import compare, gains
    from simulations.experiments.demo import publish

    started = time.perf_counter()
    common_test = _common_test(plan)
    comparison = compare(
        run=plan.run,
        sites=len(plan.sites),
        out_dir=plan.out,
        federated=plan.federated,
        echo=plan.echo,
        cache_dir=plan.cache_dir,
        common_test=common_test,
    )
    notes = [*_gain_lines(comparison, plan), *_per_site_lines(comparison, plan)]
    publish(
        comparison,
        plan.out,
        prefix=plan.run.partition,
        test_set=plan.test_set(),
        started=started,
        notes=notes,
        extra={
            "data": str(plan.data),
            "test_data": None if plan.test_data is None else str(plan.test_data),
            "test_set": {
                "description": plan.test_set(),
                "rows": comparison.sizes["scored"]["test"],
                "ids": comparison.test_ids,
            },
            "sites": [  # the rows each site trained, stopped and was scored on
                {"site": f"site {s.index}", "names": s.names, **comparison.sizes[f"site {s.index}"]}
                for s in plan.sites
            ],
            "gains": gains(comparison),
            "run": plan.run.to_dict(),
            "selections": comparison.selections,
            "per_site": comparison.per_site,
        },
    )


def _common_test(plan: Plan) -> CommonTest | None:
    """The rows that score every arm, embedded with the run's encoders (None: the sites' halves)."""
    from common.pipeline import embed_site
    from simulations.experiments.arms import CommonTest

    if not plan.common:
        return None
    # The whole manifest, unpartitioned, into the sites' cache: they then find their rows there.
    whole = SiteSettings().data_spec(plan.run)
    embedded, _, _ = embed_site(whole, cache_dir=plan.cache_dir, progress=True)
    if plan.test_data is None:
        data = embedded.subset(plan.marked)
    else:
        spec = SiteSettings(data=str(plan.test_data)).data_spec(plan.run)
        data = _relabel(embed_site(spec, cache_dir=plan.cache_dir, progress=True)[0], embedded)
    per_site = [data.subset(s.test_rows) for s in plan.sites]
    return CommonTest(data, per_site if any(len(p) for p in per_site) else None)


def _relabel(data: EmbeddedDataset, like: EmbeddedDataset) -> EmbeddedDataset:
    """``data`` with ``like``'s classes and prompt embeddings, its labels re-indexed by class name."""
    if data.labels is None:
        return replace(
            data,
            class_names=list(like.class_names),
            prompts=like.prompts,
            classes_declared=like.classes_declared,
        )
    index = {name: i for i, name in enumerate(like.class_names)}
    labels = np.array(
        [index[data.class_names[v]] if v >= 0 else -1 for v in data.labels], dtype=np.int64
    )
    return replace(
        data,
        labels=labels,
        class_names=list(like.class_names),
        prompts=like.prompts,
        classes_declared=like.classes_declared,
    )


def _gain_lines(comparison: Comparison, plan: Plan) -> list[str]:
    """One line: the federated head against the frozen encoders and against each site alone."""
    from simulations.experiments.comparison import gains

    metric = comparison.primary
    rows = {r["method"].strip(): r for r in comparison.rows}
    fed = next((r for m, r in rows.items() if m.startswith("federated")), None)
    diff = gains(comparison)
    if fed is None or metric not in diff.get("minus_frozen", {}):
        return []
    each = ", ".join(
        f"{s.label} {fed[metric] - rows[f'site {s.index} alone'][metric]:+.3f}" for s in plan.sites
    )
    return [
        f"what a hospital gains by federating: federated {metric} {fed[metric]:.3f} on the test "
        f"set, {diff['minus_frozen'][metric]:+.3f} against the frozen encoders and "
        f"{diff['minus_alone'][metric]:+.3f} against a site alone on average ({each})"
    ]


def _per_site_lines(comparison: Comparison, plan: Plan) -> list[str]:
    if not comparison.per_site:
        return []
    names = "; ".join(s.label for s in plan.sites if s.names and s.test)
    return [
        f"\n{comparison.primary} on each site's own test rows"
        + (f" ({names})" if names else "")
        + ":\n"
        + comparison.per_site_table()
        + "\n"
    ]
