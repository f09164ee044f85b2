"""IU X-ray reports: downstream-classifier macro-F1 on frozen vs head-projected text embeddings, central and federated."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from common.heads import HEAD_PRESETS
from common.metrics import CLASSIFIERS
from common.training import TrainConfig
from simulations.benchmarks.results import RESULTS_DIR, write_results
from simulations.experiments.iu_xray_arms import (
    CACHE_DIR,
    DATASET,
    DEFAULT_ALPHA,
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPOCHS,
    DEFAULT_FED_HEADS,
    DEFAULT_HEADS,
    DEFAULT_LOSSES,
    DEFAULT_LR,
    DEFAULT_PARTITIONS,
    DEFAULT_ROUNDS,
    DEFAULT_SITES,
    DEFAULT_TASKS,
    FEDERATED,
    RESULT_NAME,
    TEST_FRACTION,
    WORK_DIR,
    FederationPlan,
    Variant,
    describe_split,
    federated_variants,
    run_federated_pair,
    run_variant,
    split_reports,
    variants,
)
from simulations.experiments.iu_xray_report import federated_vs_central, render_markdown, summarize
from simulations.experiments.machine import machine_info

log = logging.getLogger(__name__)


def run_experiment(
    *,
    tasks: Sequence[str],
    seeds: Sequence[int],
    losses: Sequence[str],
    heads: Sequence[str],
    epochs: int,
    cache_dir: str | Path,
    out_dir: str | Path,
    n: int | None = None,
    text_encoder: str = "minilm",
    classifiers: Sequence[str] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    federation: FederationPlan | None = None,
) -> dict[str, Any]:
    """Run every (task, seed, variant), write ``iu_xray.json`` and ``iu_xray.md`` to ``out_dir``.

    Seed ``s`` sets the 80/20 train/test split (``split_reports``), the heads' initialisation and
    batch order, the federated partition and the classifiers' randomness; ``n`` keeps a random
    subset of the reports. Heads are trained on the labelled training reports only; classifiers
    are fitted on the training split and scored (macro-F1) on the held-out split.

    ``federation`` (None: central only) adds, per partition and (head, loss) of the plan, a head
    trained by FedAvg over simulated sites holding a partition of the same training reports
    (Flower's simulation engine, the real ClientApp/ServerApp), and a central head trained on
    exactly the rows the sites trained on (each site keeps 20% of its share as its own held-out
    split). Returns the JSON document.
    """
    if not tasks or not seeds:
        raise ConfigError("need at least one task and one seed")
    names = list(CLASSIFIERS) if classifiers is None else list(classifiers)
    unknown = [name for name in names if name not in CLASSIFIERS]
    if unknown or not names:
        raise ConfigError(f"unknown classifiers {unknown}; choose from {list(CLASSIFIERS)}")
    chosen = variants(heads, losses)
    fed_chosen: list[Variant] = []
    if federation is not None:
        federation.local_epochs(epochs)
        fed_chosen = federated_variants(federation.heads, federation.losses, federation.partitions)
    train_config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr)
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    data_info: dict[str, Any] = {}
    prepare_seconds: dict[str, float] = {}
    identity: dict[str, Any] = {}
    in_dim = 0
    for task in tasks:
        for seed in seeds:
            tick = time.perf_counter()
            site = split_reports(
                task=task, seed=seed, n=n, text_encoder=text_encoder, cache_dir=cache_dir
            )
            prepare_seconds[f"{task}/seed{seed}"] = round(time.perf_counter() - tick, 3)
            identity, in_dim = site.encoders["text"], site.train.dims["text"]
            data_info.setdefault(task, {})[f"seed{seed}"] = describe_split(site)
            for variant in chosen:
                record = run_variant(
                    variant, site, train_config=train_config, classifiers=names, seed=seed
                )
                runs.append({"task": task, "seed": seed, **record})
                log.info("%s seed %d %s: %s", task, seed, variant.key, _brief(record["f1"]))
            for fed, matched in zip(fed_chosen[::2], fed_chosen[1::2], strict=True):
                assert federation is not None
                pair = run_federated_pair(
                    fed,
                    matched,
                    site,
                    task=task,
                    seed=seed,
                    plan=federation,
                    train_config=train_config,
                    text_encoder=text_encoder,
                    cache_dir=Path(cache_dir),
                    classifiers=names,
                )
                for record in pair:
                    runs.append({"task": task, "seed": seed, **record})
                    log.info(
                        "%s seed %d %s: %s", task, seed, record["variant"], _brief(record["f1"])
                    )
    all_variants = [*chosen, *fed_chosen]
    keys = [v.key for v in all_variants]
    fed_keys = [v.key for v in fed_chosen if v.arm == FEDERATED]
    plan_sites = federation.sites if federation else 0
    plan_alpha = federation.alpha if federation else 0.0
    document = {
        "experiment": RESULT_NAME,
        "config": {
            "dataset": DATASET,
            "text_encoder": text_encoder,
            "tasks": list(tasks),
            "seeds": list(seeds),
            "losses": list(losses),
            "heads": {h: HEAD_PRESETS[h].to_dict() for h in heads},
            "train": {k: v for k, v in train_config.to_dict().items() if k not in ("loss", "seed")},
            "n": n,
            "test_fraction": TEST_FRACTION,
            "classifiers": names,
            "federation": federation.to_dict(epochs) if federation else None,
        },
        "encoder": identity,
        "variants": {
            v.key: v.label(in_dim, sites=plan_sites, alpha=plan_alpha) for v in all_variants
        },
        "arms": {v.key: v.arm for v in all_variants},
        "data": data_info,
        "runs": runs,
        "summary": {
            task: summarize(runs, task=task, keys=keys, classifiers=names) for task in tasks
        },
        "federated_vs_central": {
            task: federated_vs_central(runs, task=task, fed_keys=fed_keys, classifiers=names)
            for task in tasks
        },
        "timings": _timings(runs, prepare_seconds, time.perf_counter() - started),
        "machine": machine_info(),
    }
    out = Path(out_dir)
    write_results(out, RESULT_NAME, document, render_markdown(document))
    return document


def _brief(f1: dict[str, float]) -> str:
    return " ".join(f"{name}={value:.3f}" for name, value in f1.items())


def _timings(
    runs: list[dict[str, Any]], prepare_seconds: dict[str, float], total: float
) -> dict[str, Any]:
    train: dict[str, float] = {}
    fit: dict[str, float] = {}
    for run in runs:
        if "train" in run:
            train[run["arm"]] = round(train.get(run["arm"], 0.0) + run["train"]["seconds"], 3)
        for name, seconds in run["classifier_seconds"].items():
            fit[name] = round(fit.get(name, 0.0) + seconds, 3)
    return {
        "total_seconds": round(total, 3),
        "prepare_data_seconds": prepare_seconds,
        "head_training_seconds_by_arm": train,
        "classifier_seconds_by_name": fit,
    }


def _csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (0..N-1)")
    parser.add_argument("--tasks", type=_csv, default=list(DEFAULT_TASKS))
    parser.add_argument("--losses", type=_csv, default=list(DEFAULT_LOSSES))
    parser.add_argument("--heads", type=_csv, default=list(DEFAULT_HEADS))
    parser.add_argument("--classifiers", type=_csv, default=None, help="default: all")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--lr", type=float, default=DEFAULT_LR)
    parser.add_argument("--n", type=int, default=None, help="random subset of reports")
    parser.add_argument("--text-encoder", default="minilm")
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--central-only", action="store_true", help="skip the federated arms (no Flower runs)"
    )
    parser.add_argument("--sites", type=int, default=DEFAULT_SITES)
    parser.add_argument(
        "--rounds", type=int, default=DEFAULT_ROUNDS, help="local epochs = epochs / rounds"
    )
    parser.add_argument("--partitions", type=_csv, default=list(DEFAULT_PARTITIONS))
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="Dirichlet alpha")
    parser.add_argument("--fed-heads", type=_csv, default=list(DEFAULT_FED_HEADS))
    parser.add_argument("--fed-losses", type=_csv, default=list(DEFAULT_LOSSES))
    parser.add_argument(
        "--work", type=Path, default=WORK_DIR, help="Flower runs and simulated sites' state"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    federation = None
    if not args.central_only:
        federation = FederationPlan(
            sites=args.sites,
            rounds=args.rounds,
            partitions=tuple(args.partitions),
            alpha=args.alpha,
            heads=tuple(args.fed_heads),
            losses=tuple(args.fed_losses),
            work_dir=args.work,
        )
    document = run_experiment(
        tasks=args.tasks,
        seeds=list(range(args.seeds)),
        losses=args.losses,
        heads=args.heads,
        epochs=args.epochs,
        cache_dir=args.cache_dir,
        out_dir=args.out,
        n=args.n,
        text_encoder=args.text_encoder,
        classifiers=args.classifiers,
        batch_size=args.batch_size,
        lr=args.lr,
        federation=federation,
    )
    print(render_markdown(document))
    return 0


if __name__ == "__main__":
    from simulations.experiments.entry import run_main

    run_main("iu_xray", main)
