"""IU X-ray reports: downstream-classifier macro-F1 on frozen vs head-projected text embeddings, central and federated."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.atomic import atomic_write_json, atomic_write_text
from common.config import RunSettings
from common.data.registry import load_dataset
from common.embedding import EmbeddedDataset, embed_dataset
from common.errors import ConfigError, DataError
from common.heads import HEAD_PRESETS
from common.metrics import CLASSIFIERS, classifier_suite, format_table
from common.pipeline import DataSpec, SiteData, embed_site, get_encoder
from common.training import (
    LABEL_LOSSES,
    HeadModel,
    TrainConfig,
    build_head_model,
    train_head,
)
from simulations.machine import machine_info

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
CACHE_DIR = REPO_ROOT / ".fedembed" / "cache"
# Outside the app directory: `flwr run` walks every file under it when it builds the FAB.
WORK_DIR = Path(tempfile.gettempdir()) / "fedembed-iu-xray"
DATASET = "iu-xray-reports"
RESULT_NAME = "iu_xray"
FROZEN = "frozen"
CENTRAL, FEDERATED, MATCHED = "central", "federated", "matched"
TEST_FRACTION = 0.2
DEFAULT_TASKS = ("abnormal", "cardiomegaly")
DEFAULT_LOSSES = ("supcon", "pairwise")
DEFAULT_HEADS = ("default", "paper")
DEFAULT_FED_HEADS = ("default",)
DEFAULT_PARTITIONS = ("iid", "dirichlet")
DEFAULT_SITES = 4
DEFAULT_ROUNDS = 10
DEFAULT_ALPHA = 0.3
DEFAULT_EPOCHS = 30
DEFAULT_BATCH_SIZE = 128
DEFAULT_LR = 2e-3


@dataclass(frozen=True)
class Variant:
    """One embedding variant: the frozen vectors, or a head preset trained with a loss.

    ``arm``: "central" (one head on all training reports), "federated" (FedAvg over simulated
    sites holding a ``partition`` of the training reports) or "matched" (one central head on
    exactly the rows the federated sites of ``partition`` trained on).
    """

    key: str
    head: str | None = None
    loss: str | None = None
    arm: str = CENTRAL
    partition: str | None = None

    def label(self, in_dim: int, *, sites: int = 0, alpha: float = 0.0) -> str:
        """Table row name, e.g. ``frozen (384-d)`` or ``default head 384-512-128, supcon, FedAvg 4 sites iid``."""
        if self.head is None:
            return f"{FROZEN} ({in_dim}-d)"
        widths = "-".join(str(w) for w in HEAD_PRESETS[self.head].widths(in_dim))
        text = f"{self.head} head {widths}, {self.loss}"
        scheme = _scheme(self.partition or "", alpha)
        if self.arm == FEDERATED:
            return f"{text}, FedAvg {sites} sites {scheme}"
        if self.arm == MATCHED:
            return f"{text}, central on the {scheme} sites' training rows"
        return text


def _scheme(partition: str, alpha: float) -> str:
    return f"dirichlet(α={alpha:g})" if partition == "dirichlet" else partition


def variants(heads: Sequence[str], losses: Sequence[str]) -> list[Variant]:
    """The frozen baseline followed by every (head preset, loss) combination, trained centrally."""
    _check(heads, losses)
    heads_trained = [Variant(f"{h}/{loss}", h, loss) for h in heads for loss in losses]
    return [Variant(FROZEN), *heads_trained]


def federated_variants(
    heads: Sequence[str], losses: Sequence[str], partitions: Sequence[str]
) -> list[Variant]:
    """For each partition and (head, loss): the federated head and its matched central head."""
    _check(heads, losses)
    out: list[Variant] = []
    for partition in partitions:
        if partition not in ("iid", "dirichlet"):
            raise ConfigError(
                f"partition {partition!r}: iu-xray-reports supports iid or dirichlet (label skew)"
            )
        for head in heads:
            for loss in losses:
                out.append(
                    Variant(f"{head}/{loss}/fed-{partition}", head, loss, FEDERATED, partition)
                )
                out.append(
                    Variant(f"{head}/{loss}/matched-{partition}", head, loss, MATCHED, partition)
                )
    return out


def _check(heads: Sequence[str], losses: Sequence[str]) -> None:
    for head in heads:
        if head not in HEAD_PRESETS:
            raise ConfigError(f"unknown head preset {head!r}; choose from {sorted(HEAD_PRESETS)}")
    for loss in losses:
        if loss not in LABEL_LOSSES:
            raise ConfigError(
                f"loss {loss!r} does not use labels (text-only data); choose from {list(LABEL_LOSSES)}"
            )


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Temporarily run torch ops on ``count`` threads (tiny heads train faster on one)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_size(n: int | None, *, total: int) -> tuple[int, int]:
    """(training reports, held-out reports) of a subset of ``n`` reports (all ``total`` if None)."""
    count = total if n is None else n
    if not 2 <= count <= total:
        raise ConfigError(f"n must be in 2..{total} for {DATASET}, got {n}")
    held_out = max(1, round(count * TEST_FRACTION))
    return count - held_out, held_out


def split_reports(
    *, task: str, seed: int, n: int | None, text_encoder: str, cache_dir: str | Path
) -> SiteData:
    """Seed ``seed``'s embedded train/test split of the reports.

    Training reports = the dataset loader's seeded random subset of ``n_train`` reports: exactly
    the pool the federated sites partition (run-config ``dataset-n`` = ``n_train``, ``seed`` =
    ``seed``). Held-out reports = the others (a seeded sample of them when ``n`` is given), which
    no site ever loads.
    """
    spec = DataSpec(
        dataset=DATASET,
        n=None,
        seed=seed,
        task=task,
        image_encoder="none",
        text_encoder=text_encoder,
    )
    full = load_dataset(DATASET, seed=seed, task=task)  # raw reports: ids and labels, no vectors
    n_train, n_test = train_size(n, total=len(full))
    train, report, identities = embed_site(replace(spec, n=n_train), cache_dir=cache_dir)
    train_ids = set(train.ids)
    rest = np.array([i for i, rid in enumerate(full.ids) if rid not in train_ids], dtype=np.int64)
    if len(train_ids) != n_train or len(rest) != len(full) - n_train:
        raise DataError(f"{DATASET}: the {n_train}-report subset of seed {seed} is not a subset")
    if n_test < len(rest):
        rest = np.sort(np.random.default_rng(seed).choice(rest, size=n_test, replace=False))
    encoder = get_encoder(text_encoder, modality="text", max_length=spec.max_length)
    test, _ = embed_dataset(full.subset(rest), cache_dir=cache_dir, text_encoder=encoder)
    return SiteData(train, test, report, identities)


def labelled(data: EmbeddedDataset, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``features`` whose label is known (>= 0), with those labels."""
    assert data.labels is not None
    keep = data.labels >= 0
    return features[keep], data.labels[keep]


def score(
    train_x: np.ndarray,
    test_x: np.ndarray,
    site: SiteData,
    *,
    classifiers: Sequence[str],
    seed: int,
) -> tuple[dict[str, float], dict[str, float]]:
    """Macro-F1 and fit+predict seconds of each classifier (trained on train, scored on test)."""
    tx, ty = labelled(site.train, train_x)
    ex, ey = labelled(site.test, test_x)
    f1: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for name in classifiers:
        started = time.perf_counter()
        f1.update(classifier_suite(tx, ty, ex, ey, seed=seed, classifiers=[name]))
        seconds[name] = round(time.perf_counter() - started, 3)
    return f1, seconds


def train_central(
    variant: Variant, data: EmbeddedDataset, *, train_config: TrainConfig, seed: int
) -> tuple[HeadModel, dict[str, Any]]:
    """The variant's head trained on ``data`` in this process; its training summary."""
    assert variant.head is not None and variant.loss is not None
    model = build_head_model(
        dims=data.dims,
        head_config=HEAD_PRESETS[variant.head],
        layout="two-tower",
        loss=variant.loss,
        num_classes=data.num_classes,
        seed=seed,
    )
    config = TrainConfig(
        loss=variant.loss,
        epochs=train_config.epochs,
        batch_size=train_config.batch_size,
        lr=train_config.lr,
        seed=seed,
    )
    with torch_threads(1):
        result = train_head(model, data, config)
    return model, {
        "final_loss": result.loss,
        "examples": result.num_examples,
        "steps": result.steps,
        "seconds": round(result.seconds, 3),
    }


def scored_record(
    variant: Variant,
    model: HeadModel | None,
    site: SiteData,
    *,
    classifiers: Sequence[str],
    seed: int,
) -> dict[str, Any]:
    """The classifier suite on the frozen (model None) or projected train/test embeddings."""
    assert site.train.text is not None and site.test.text is not None
    if model is None:
        train_x, test_x = site.train.text, site.test.text
    else:
        with torch_threads(1):
            train_x = model.project(site.train)["text"]
            test_x = model.project(site.test)["text"]
    record: dict[str, Any] = {
        "variant": variant.key,
        "arm": variant.arm,
        "head": variant.head,
        "loss": variant.loss,
        "partition": variant.partition,
        "dim": int(train_x.shape[1]),
    }
    record["f1"], record["classifier_seconds"] = score(
        train_x, test_x, site, classifiers=classifiers, seed=seed
    )
    return record


def run_variant(
    variant: Variant,
    site: SiteData,
    *,
    train_config: TrainConfig,
    classifiers: Sequence[str],
    seed: int,
) -> dict[str, Any]:
    """Train the variant's head (if any) on the training split centrally and score its embeddings."""
    if variant.head is None:
        return scored_record(variant, None, site, classifiers=classifiers, seed=seed)
    model, train = train_central(variant, site.train, train_config=train_config, seed=seed)
    record = scored_record(variant, model, site, classifiers=classifiers, seed=seed)
    return {**record, "train": train}


@dataclass(frozen=True)
class FederationPlan:
    """How each federated arm runs: ``sites`` simulated sites, ``rounds`` x local epochs = the central epochs."""

    sites: int = DEFAULT_SITES
    rounds: int = DEFAULT_ROUNDS
    partitions: tuple[str, ...] = DEFAULT_PARTITIONS
    alpha: float = DEFAULT_ALPHA
    heads: tuple[str, ...] = DEFAULT_FED_HEADS
    losses: tuple[str, ...] = DEFAULT_LOSSES
    work_dir: Path = WORK_DIR

    def local_epochs(self, epochs: int) -> int:
        if self.sites < 2 or self.rounds < 1 or epochs % self.rounds:
            raise ConfigError(
                f"federated arms: need >= 2 sites and rounds ({self.rounds}) dividing the central "
                f"epochs ({epochs}) so that rounds x local epochs = central epochs"
            )
        return epochs // self.rounds

    def to_dict(self, epochs: int) -> dict[str, Any]:
        return {
            "sites": self.sites,
            "rounds": self.rounds,
            "local_epochs": self.local_epochs(epochs),
            "partitions": list(self.partitions),
            "alpha": self.alpha,
            "heads": list(self.heads),
            "losses": list(self.losses),
            "strategy": "fedavg",
            "engine": "Flower simulation engine (simulations.federate.simulate), one site at a time",
        }


@dataclass
class FederatedHead:
    """A federated arm's final global head and what the real sites held (read from their bundles)."""

    model: HeadModel
    sites: dict[str, dict[str, Any]]
    train_ids: set[str]
    seconds: float
    last_round: dict[str, Any] = field(default_factory=dict)


def fed_run_config(
    *,
    task: str,
    seed: int,
    head: str,
    loss: str,
    partition: str,
    plan: FederationPlan,
    n_train: int,
    text_encoder: str,
    train_config: TrainConfig,
) -> dict[str, Any]:
    """The Flower run-config of one federated arm: the sites' pool is seed ``seed``'s training reports."""
    config: dict[str, Any] = {
        "dataset": DATASET,
        "dataset-n": n_train,
        "task": task,
        "seed": seed,
        "partition": partition,
        "alpha": plan.alpha,
        "min-sites": plan.sites,
        "num-server-rounds": plan.rounds,
        "local-epochs": plan.local_epochs(train_config.epochs),
        "batch-size": train_config.batch_size,
        "lr": train_config.lr,
        "loss": loss,
        "head": head,
        "layout": "two-tower",
        "strategy": "fedavg",
        "image-encoder": "none",
        "text-encoder": text_encoder,
    }
    RunSettings.from_run_config(config)  # ConfigError before any process starts
    return config


def federate_head(
    run_config: dict[str, Any], *, sites: int, home: Path, cache_dir: Path
) -> FederatedHead:
    """One federated arm on Flower's simulation engine in a fresh ``home`` (sites share ``cache_dir``)."""
    from common.artifacts import load_head
    from simulations.federate import simulate
    from simulations.localfed import FlowerError

    home = home.resolve()
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    target = Path(cache_dir).resolve()
    target.mkdir(parents=True, exist_ok=True)
    os.symlink(target, home / "cache", target_is_directory=True)  # $FEDEMBED_HOME/cache
    started = time.perf_counter()
    fed = simulate(
        out_dir=home,
        sites=sites,
        run_config=run_config,
        cpus_per_site=os.cpu_count() or 1,  # one virtual site at a time: lean on a shared machine
        echo=False,
    )
    seconds = time.perf_counter() - started
    if not fed.ok:
        raise FlowerError(f"federated arm failed: {fed.result.status}; log {fed.result.log_path}")
    model, _ = load_head(fed.final_head)
    held, train_ids = site_holdings(home, sites)
    last = fed.history[-1].get("site_metrics_mean", {}) if fed.history else {}
    return FederatedHead(model, held, train_ids, round(seconds, 3), last)


def site_holdings(home: Path, sites: int) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """Ids each simulated site held, from the embedded-data bundle its ClientApp wrote.

    Returns per site the training / local held-out sizes and ids and the union of training ids.
    """
    from common.tensorfile import read_tensorfile

    held: dict[str, dict[str, Any]] = {}
    train_ids: set[str] = set()
    for index in range(sites):
        name = f"site-{index}"
        bundles = sorted((home / "sites" / name / "embeddings").glob("*.safetensors"))
        if len(bundles) != 1:
            raise DataError(
                f"{home / 'sites' / name}: expected one data bundle, found {len(bundles)}"
            )
        tensors, meta = read_tensorfile(bundles[0], key="fedembed")
        labels = tensors.get("train.labels", np.zeros(0, dtype=np.int64))
        held[name] = {
            "train_ids": list(meta["train.ids"]),
            "held_out_ids": list(meta["test.ids"]),
            "train_label_counts": {
                str(int(k)): int(v)
                for k, v in zip(*np.unique(labels, return_counts=True), strict=True)
            },
        }
        train_ids.update(meta["train.ids"])
    return held, train_ids


def check_no_leak(held: dict[str, dict[str, Any]], site: SiteData) -> None:
    """Raise DataError if any site held a held-out report or a report outside the training split."""
    test_ids, train_ids = set(site.test.ids), set(site.train.ids)
    for name, rows in held.items():
        ids = set(rows["train_ids"]) | set(rows["held_out_ids"])
        if ids & test_ids:
            raise DataError(f"{name} held {len(ids & test_ids)} held-out test reports")
        if ids - train_ids:
            raise DataError(
                f"{name} held {len(ids - train_ids)} reports outside the training split"
            )


def run_federated_pair(
    fed: Variant,
    matched: Variant,
    site: SiteData,
    *,
    task: str,
    seed: int,
    plan: FederationPlan,
    train_config: TrainConfig,
    text_encoder: str,
    cache_dir: Path,
    classifiers: Sequence[str],
) -> list[dict[str, Any]]:
    """The federated head of ``fed`` and the central head on the same training rows, both scored."""
    assert fed.head is not None and fed.loss is not None and fed.partition is not None
    config = fed_run_config(
        task=task,
        seed=seed,
        head=fed.head,
        loss=fed.loss,
        partition=fed.partition,
        plan=plan,
        n_train=len(site.train),
        text_encoder=text_encoder,
        train_config=train_config,
    )
    home = plan.work_dir / task / f"seed{seed}" / fed.key.replace("/", "-")
    result = federate_head(config, sites=plan.sites, home=home, cache_dir=cache_dir)
    check_no_leak(result.sites, site)
    record = scored_record(fed, result.model, site, classifiers=classifiers, seed=seed)
    record["train"] = {
        "seconds": result.seconds,
        "rounds": plan.rounds,
        "local_epochs": config["local-epochs"],
        "last_round_site_metrics": result.last_round,
    }
    record["sites"] = {
        name: {
            "train": len(rows["train_ids"]),
            "local_held_out": len(rows["held_out_ids"]),
            "train_label_counts": rows["train_label_counts"],
        }
        for name, rows in result.sites.items()
    }
    rows = [i for i, rid in enumerate(site.train.ids) if rid in result.train_ids]
    model, train = train_central(
        matched, site.train.subset(rows), train_config=train_config, seed=seed
    )
    twin = scored_record(matched, model, site, classifiers=classifiers, seed=seed)
    return [record, {**twin, "train": train}]


def describe_split(site: SiteData) -> dict[str, Any]:
    """Sizes and class counts of a split (unlabelled rows counted apart)."""

    def counts(data: EmbeddedDataset) -> dict[str, int]:
        assert data.labels is not None
        out = {name: int((data.labels == i).sum()) for i, name in enumerate(data.class_names)}
        out["unlabelled"] = int((data.labels < 0).sum())
        return out

    return {"train": counts(site.train), "test": counts(site.test)}


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
    atomic_write_json(out / f"{RESULT_NAME}.json", document)
    atomic_write_text(out / f"{RESULT_NAME}.md", render_markdown(document))
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
    sys.exit(main())
