"""`fedembed demo`: four simulated hospitals on synthetic radiology: frozen vs alone vs pooled vs federated."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.config import RunSettings, SiteSettings
from simulations.benchmarks.results import write_results

if TYPE_CHECKING:  # the experiment imports torch: only when a comparison runs
    from simulations.experiments.arms import CommonTest
    from simulations.experiments.comparison import Comparison

ROUNDS = 20
SITES = 4
EXAMPLES = 1200
OUT_DIR = "runs/demo"
TEST_PER_SITE = 250
"""Test rows per hospital, drawn from its scanner's generator apart from every site's data: the
sites' own test halves held 120 rows in all, where one query moved R@10 by 0.004."""
TEST_SEED_OFFSET = 104_729
"""The test rows' generator seed is the run's plus this (the coordinator's round curve uses +7,919)."""
TRAINING: dict[str, Any] = {
    "local-epochs": 8,
    "batch-size": 64,
    # "auto" (the default): on labelled pairs with class prompts its federation trains
    # choose_loss's objective, and the pooled and single-site arms, which hold out validation
    # rows, also try its alternatives and keep the better
    "loss": "auto",
    "encoder-image-size": 128,
}
"""The demo's run-config besides data and rounds (`fedembed compare` starts from it too)."""


def run_demo(
    *, out_dir: str | Path = OUT_DIR, n: int = EXAMPLES, rounds: int = ROUNDS, sites: int = SITES
) -> Path:
    """Embed (cached), train every baseline, run a real Flower simulation, print one table."""
    from simulations.experiments.comparison import compare

    out = Path(out_dir).resolve()
    started = time.perf_counter()
    run = RunSettings.from_run_config(
        {
            "dataset": "synthetic-radiology",
            "dataset-n": n,
            "partition": "site",  # each hospital is one scanner/acquisition profile
            "num-server-rounds": rounds,
            **TRAINING,
            "min-sites": sites,
            "test-rows": "exclude",  # the scored rows are the test set below, in no site's data
        }
    )
    print(
        f"fedembed demo: {n} synthetic chest radiographs + reports split over {sites} hospitals with "
        f"different scanners.\n  frozen MobileNetV2 (images) + MiniLM (reports) embeddings, cached in {out}/cache;\n"
        f"  a projection head trained with a CLIP-style loss (+ labels and class prompts): each hospital\n"
        f"  alone, pooled (upper bound),"
        f" and federated with Flower (FedAvg, {rounds} rounds; only head weights travel)."
    )
    test = scored_set(run, sites, cache_dir=out / "cache")
    comparison = compare(run=run, sites=sites, out_dir=out, federated=True, common_test=test)
    publish(
        comparison,
        out,
        prefix="demo",
        notes=gain_lines(comparison),
        test_set=f"test set: {len(test.data)} radiographs + reports, {TEST_PER_SITE} from each "
        "hospital's scanner, generated apart from every site's data; each hospital's held-out "
        "split picks each arm's stopping point.",
        started=started,
    )
    return out


def scored_set(run: RunSettings, sites: int, *, cache_dir: Path) -> CommonTest:
    """``TEST_PER_SITE`` new rows of each site's scanner profile (another generator seed),
    embedded as the sites embed theirs: what every arm of the demo is scored on. Their ids are
    prefixed "test-" (the generator numbers every seed's rows alike)."""
    from common.pipeline import embed_site
    from simulations.experiments.arms import CommonTest, concat_embedded

    per_site = []
    for k in range(sites):
        spec = SiteSettings(partition_id=k, num_partitions=sites).data_spec(run)
        rows = embed_site(
            replace(spec, n=TEST_PER_SITE * sites, seed=run.seed + TEST_SEED_OFFSET),
            cache_dir=cache_dir,
        )[0]
        per_site.append(replace(rows, ids=[f"test-{i}" for i in rows.ids]))
    return CommonTest(concat_embedded(per_site), per_site)


def gain_lines(comparison: Comparison) -> list[str]:
    """One line: the federated head minus the frozen embeddings and minus a site alone, per metric."""
    from simulations.experiments.comparison import gains

    gained = gains(comparison)
    if not gained:
        return []
    return [
        "what a hospital gains by federating: "
        + "; ".join(
            f"vs {base}: " + ", ".join(f"{k} {v:+.3f}" for k, v in deltas.items())
            for base, deltas in (
                ("the frozen embeddings (+ lstsq map)", gained["minus_frozen"]),
                ("training alone (mean site)", gained["minus_alone"]),
            )
        )
    ]


def publish(
    comparison: Comparison,
    out: Path,
    *,
    prefix: str,
    test_set: str,
    started: float,
    notes: Sequence[str] = (),
    extra: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Save results.json (+ ``extra``), results.md and the figures in ``out``; print the table,
    the federated / centralized ratios, ``notes``, what ``test_set`` was and where it all is."""
    from simulations.experiments.comparison import ratios
    from simulations.experiments.comparison_figures import plot_comparison

    table = comparison.table()
    ratio = ratios(comparison)
    document = {
        "rows": comparison.rows,
        "seconds": comparison.seconds,
        "ratios": ratio,
        "selections": comparison.selections,
        **(extra or {}),
    }
    figures = plot_comparison(comparison, out, prefix=prefix)
    lines = [f"federated / centralized: {', '.join(f'{k} {v:.2f}' for k, v in ratio.items())}"]
    lines = (lines if ratio else []) + [*notes, test_set]
    write_results(
        out,
        "results",
        document,
        table
        + "\n\n"
        + "".join(f"{line}\n\n" for line in lines)
        + "".join(f"![{p.stem}]({p.name})\n" for p in figures),
    )
    print()
    print(table)
    if ratio:
        print(f"\n{lines[0]}")
    for line in notes:
        print(line)
    print(f"{test_set} Results in {out}/ ({time.perf_counter() - started:.0f} s)")
    print("figures: " + ", ".join(str(p) for p in figures))
    return figures
