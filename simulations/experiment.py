"""Should we federate? Frozen vs each site alone vs centralized vs federated, same splits, same evaluation."""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.artifacts import load_head
from common.atomic import atomic_write_json, atomic_write_text
from common.config import RunSettings, SiteSettings
from common.embedding import EmbeddedDataset
from common.evaluation import evaluate_head
from common.heads import HEAD_PRESETS
from common.metrics import format_table
from common.pipeline import SiteData, prepare_site_data
from common.training import HeadModel, TrainConfig, build_head_model, train_head

HEADLINE = ("mean_R@1", "mean_R@5", "mean_R@10", "zs_acc", "zs_auroc", "probe_f1_macro")


@dataclass
class Comparison:
    """Rows of one comparison (one partition scheme) and the settings that produced them."""

    partition: str
    sites: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def table(self) -> str:
        return format_table(
            self.rows, ["method", *[c for c in HEADLINE if any(c in r for r in self.rows)]]
        )


def concat_embedded(parts: Sequence[EmbeddedDataset]) -> EmbeddedDataset:
    """Row-wise union of several sites' embedded data (same classes and prompts)."""

    def cat(name: str) -> np.ndarray | None:
        values = [getattr(p, name) for p in parts]
        return None if any(v is None for v in values) else np.concatenate(values)

    groups = None
    site_groups = [p.text_groups for p in parts]
    if all(g is not None and g.size for g in site_groups):  # per-site ids: shift them apart
        offset, shifted = 0, []
        for g in site_groups:
            assert g is not None
            shifted.append(g + offset)
            offset += int(g.max()) + 1
        groups = np.concatenate(shifted)
    return EmbeddedDataset(
        ids=[i for p in parts for i in p.ids],
        image=cat("image"),
        text=cat("text"),
        labels=cat("labels"),
        class_names=list(parts[0].class_names),
        prompts=parts[0].prompts,
        text_groups=groups,
    )


def _train(run: RunSettings, data: EmbeddedDataset, *, epochs: int) -> HeadModel:
    model = build_head_model(
        dims=data.dims,
        head_config=HEAD_PRESETS[run.head],
        layout=run.layout,
        loss=run.loss,
        num_classes=data.num_classes or None,
        seed=run.seed,
    )
    config = TrainConfig(
        loss=run.loss, epochs=epochs, batch_size=run.batch_size, lr=run.lr, seed=run.seed
    )
    train_head(model, data, config)
    return model


def _row(
    method: str, model: HeadModel | None, train: EmbeddedDataset, test: EmbeddedDataset
) -> dict[str, Any]:
    report = evaluate_head(model, train, test)
    source = (
        report.row("projected")
        if model is not None
        else {**report.row("frozen+lstsq"), **report.row("frozen")}
    )
    return {"method": method, **{k: v for k, v in source.items() if k in HEADLINE}}


def compare(
    *,
    run: RunSettings,
    sites: int,
    out_dir: Path,
    federated: bool = True,
    echo: bool = False,
) -> Comparison:
    """Run every method on the run's dataset split over ``sites`` sites (partition from ``run``)."""
    import torch

    torch.set_num_threads(2)
    out_dir.mkdir(parents=True, exist_ok=True)
    comparison = Comparison(
        partition=f"{run.partition}"
        + (f"(alpha={run.alpha})" if run.partition == "dirichlet" else ""),
        sites=sites,
    )
    started = time.perf_counter()
    site_data: list[SiteData] = [
        prepare_site_data(
            SiteSettings(partition_id=i, num_partitions=sites).data_spec(run),
            cache_dir=out_dir / "cache",
        )
        for i in range(sites)
    ]
    comparison.seconds["embedding"] = time.perf_counter() - started
    pooled_train = concat_embedded([s.train for s in site_data])
    pooled_test = concat_embedded([s.test for s in site_data])
    epochs = run.num_server_rounds * run.local_epochs
    comparison.rows.append(
        _row("frozen (+ closed-form lstsq alignment)", None, pooled_train, pooled_test)
    )

    started = time.perf_counter()
    local_rows = [
        _row(f"site {i} alone", _train(run, s.train, epochs=epochs), s.train, pooled_test)
        for i, s in enumerate(site_data)
    ]
    comparison.seconds["local"] = time.perf_counter() - started
    average: dict[str, Any] = {"method": "each site alone (mean)"}
    for key in HEADLINE:
        values = [r[key] for r in local_rows if key in r]
        if values:
            average[key] = float(np.mean(values))
    comparison.rows.append(average)

    started = time.perf_counter()
    comparison.rows.append(
        _row(
            "centralized (pooled, upper bound)",
            _train(run, pooled_train, epochs=epochs),
            pooled_train,
            pooled_test,
        )
    )
    comparison.seconds["centralized"] = time.perf_counter() - started

    if federated:
        from simulations.federate import simulate

        started = time.perf_counter()
        run_config = {
            k.replace("_", "-"): v
            for k, v in run.to_dict().items()
            if k not in ("run_dir", "resume")
        }
        fed = simulate(out_dir=out_dir, sites=sites, run_config=run_config, echo=echo)
        comparison.seconds["federated"] = time.perf_counter() - started
        if not fed.ok:
            raise RuntimeError(
                f"federated run failed: {fed.result.status}; log {fed.result.log_path}"
            )
        model, _ = load_head(fed.final_head)
        comparison.rows.append(
            _row(
                f"federated ({run.strategy}, {run.num_server_rounds} rounds)",
                model,
                pooled_train,
                pooled_test,
            )
        )
    comparison.rows.extend({**r, "method": f"  {r['method']}"} for r in local_rows)
    return comparison


def ratios(comparison: Comparison) -> dict[str, float]:
    """Federated / centralized for each headline metric (the issue's acceptance ratios)."""
    rows = {r["method"].strip().split(" (")[0]: r for r in comparison.rows}
    if "federated" not in rows:
        return {}
    fed, central = rows["federated"], rows["centralized"]
    return {
        k: fed[k] / central[k] for k in HEADLINE if k in fed and k in central and central[k] > 0
    }


def run_comparisons(
    *,
    out_dir: Path,
    work_dir: Path,
    sites: int = 4,
    partitions: Sequence[tuple[str, float]] = (("iid", 0.5), ("dirichlet", 0.3)),
    overrides: dict[str, Any] | None = None,
    federated: bool = True,
    echo: bool = False,
) -> dict[str, Any]:
    """One comparison per partition scheme; results JSON + markdown in ``out_dir``, caches and runs in ``work_dir``."""
    results: dict[str, Any] = {"machine": _machine(), "sites": sites, "comparisons": []}
    markdown = [f"# Federated vs centralized vs local ({sites} sites)\n"]
    for scheme, alpha in partitions:
        settings = {"partition": scheme, "alpha": alpha, "min-sites": sites, **(overrides or {})}
        run = RunSettings.from_run_config(settings)
        comparison = compare(
            run=run, sites=sites, out_dir=work_dir / scheme, federated=federated, echo=echo
        )
        entry: dict[str, Any] = {
            "partition": comparison.partition,
            "run": run.to_dict(),
            "rows": comparison.rows,
            "federated_over_centralized": ratios(comparison),
            "seconds": comparison.seconds,
        }
        results["comparisons"].append(entry)
        markdown += [f"## partition: {comparison.partition}\n", comparison.table(), ""]
        if entry["federated_over_centralized"]:
            shown = ", ".join(
                f"{k} {v:.3f}" for k, v in entry["federated_over_centralized"].items()
            )
            markdown.append(f"federated / centralized: {shown}\n")
    atomic_write_json(out_dir / "comparison.json", results)
    atomic_write_text(out_dir / "comparison.md", "\n".join(markdown) + "\n")
    return results


def _machine() -> dict[str, Any]:
    import os

    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--out", default="simulations/results/federated", help="results directory (JSON + markdown)"
    )
    parser.add_argument(
        "--work", default="runs/experiment", help="caches, site state and Flower runs"
    )
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--n", type=int, default=2000, help="pooled examples")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument(
        "--no-federated", action="store_true", help="skip the Flower run (baselines only)"
    )
    args = parser.parse_args(argv)
    overrides = {
        "dataset-n": args.n,
        "num-server-rounds": args.rounds,
        "local-epochs": args.local_epochs,
    }
    run_comparisons(
        out_dir=Path(args.out),
        work_dir=Path(args.work),
        sites=args.sites,
        overrides=overrides,
        federated=not args.no_federated,
    )
    print((Path(args.out) / "comparison.md").read_text())


if __name__ == "__main__":
    main()
