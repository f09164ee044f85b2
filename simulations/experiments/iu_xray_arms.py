"""IU X-ray reports experiment: its settings, the central and federated arms, each scored by the classifier suite."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import RunSettings
from common.data.registry import load_dataset
from common.embedding import EmbeddedDataset, embed_dataset
from common.errors import ConfigError, DataError
from common.heads import HEAD_PRESETS
from common.losses import NEEDS_LABELS
from common.metrics import classifier_suite
from common.pipeline import DataSpec, SiteData, embed_site, get_encoder
from common.training import HeadModel, TrainConfig, build_head_model, train_head

REPO_ROOT = Path(__file__).resolve().parents[2]
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
        if loss not in NEEDS_LABELS:
            raise ConfigError(
                f"loss {loss!r} does not use labels (text-only data); choose from {list(NEEDS_LABELS)}"
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
            "engine": "Flower simulation engine (simulations.flower.federate.simulate), one site at a time",
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
    from simulations.flower.federate import simulate
    from simulations.flower.flwr_cli import FlowerError

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
