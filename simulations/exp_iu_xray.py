"""IU X-ray reports: downstream-classifier macro-F1 on frozen vs head-projected text embeddings."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.atomic import atomic_write_json, atomic_write_text
from common.embedding import EmbeddedDataset
from common.errors import ConfigError
from common.heads import HEAD_PRESETS
from common.metrics import CLASSIFIERS, classifier_suite, format_table
from common.pipeline import DataSpec, SiteData, prepare_site_data
from common.training import LABEL_LOSSES, TrainConfig, build_head_model, train_head
from simulations.bench_embedding import machine_info

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
CACHE_DIR = REPO_ROOT / ".fedembed" / "cache"
DATASET = "iu-xray-reports"
RESULT_NAME = "iu_xray"
FROZEN = "frozen"
DEFAULT_TASKS = ("abnormal", "cardiomegaly")
DEFAULT_LOSSES = ("supcon", "pairwise")
DEFAULT_HEADS = ("default", "paper")
DEFAULT_EPOCHS = 30
DEFAULT_BATCH_SIZE = 128
DEFAULT_LR = 2e-3


@dataclass(frozen=True)
class Variant:
    """One embedding variant: the frozen vectors, or a head preset trained with a loss."""

    key: str
    head: str | None = None
    loss: str | None = None

    def label(self, in_dim: int) -> str:
        """Table row name, e.g. ``frozen (384-d)`` or ``default head 384-512-128, supcon``."""
        if self.head is None:
            return f"{FROZEN} ({in_dim}-d)"
        widths = "-".join(str(w) for w in HEAD_PRESETS[self.head].widths(in_dim))
        return f"{self.head} head {widths}, {self.loss}"


def variants(heads: Sequence[str], losses: Sequence[str]) -> list[Variant]:
    """The frozen baseline followed by every (head preset, loss) combination."""
    for head in heads:
        if head not in HEAD_PRESETS:
            raise ConfigError(f"unknown head preset {head!r}; choose from {sorted(HEAD_PRESETS)}")
    for loss in losses:
        if loss not in LABEL_LOSSES:
            raise ConfigError(
                f"loss {loss!r} does not use labels (text-only data); choose from {list(LABEL_LOSSES)}"
            )
    heads_trained = [Variant(f"{h}/{loss}", h, loss) for h in heads for loss in losses]
    return [Variant(FROZEN), *heads_trained]


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Temporarily run torch ops on ``count`` threads (tiny heads train faster on one)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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


def run_variant(
    variant: Variant,
    site: SiteData,
    *,
    train_config: TrainConfig,
    classifiers: Sequence[str],
    seed: int,
) -> dict[str, Any]:
    """Train the variant's head (if any) on the training split and score its embeddings."""
    assert site.train.text is not None and site.test.text is not None
    record: dict[str, Any] = {"variant": variant.key, "head": variant.head, "loss": variant.loss}
    if variant.head is None or variant.loss is None:
        train_x, test_x = site.train.text, site.test.text
    else:
        model = build_head_model(
            dims=site.train.dims,
            head_config=HEAD_PRESETS[variant.head],
            layout="two-tower",
            loss=variant.loss,
            num_classes=site.train.num_classes,
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
            result = train_head(model, site.train, config)
            train_x = model.project(site.train)["text"]
            test_x = model.project(site.test)["text"]
        record["train"] = {
            "final_loss": result.loss,
            "examples": result.num_examples,
            "steps": result.steps,
            "seconds": round(result.seconds, 3),
        }
    record["dim"] = int(train_x.shape[1])
    record["f1"], record["classifier_seconds"] = score(
        train_x, test_x, site, classifiers=classifiers, seed=seed
    )
    return record


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
) -> dict[str, Any]:
    """Run every (task, seed, variant), write ``iu_xray.json`` and ``iu_xray.md`` to ``out_dir``.

    Seed ``s`` sets the stratified 80/20 train/test split, the head's initialisation and batch
    order, and the classifiers' randomness; ``n`` keeps a fixed random subset of the reports.
    Heads are trained on the labelled training reports only; classifiers are fitted on the
    training split and scored (macro-F1) on the held-out split. Returns the JSON document.
    """
    if not tasks or not seeds:
        raise ConfigError("need at least one task and one seed")
    names = list(CLASSIFIERS) if classifiers is None else list(classifiers)
    unknown = [name for name in names if name not in CLASSIFIERS]
    if unknown or not names:
        raise ConfigError(f"unknown classifiers {unknown}; choose from {list(CLASSIFIERS)}")
    chosen = variants(heads, losses)
    train_config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr)
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    data_info: dict[str, Any] = {}
    prepare_seconds: dict[str, float] = {}
    identity: dict[str, Any] = {}
    in_dim = 0
    for task in tasks:
        for seed in seeds:
            spec = DataSpec(
                dataset=DATASET,
                n=n,
                task=task,
                image_encoder="none",
                text_encoder=text_encoder,
                split_seed=seed,
            )
            tick = time.perf_counter()
            site = prepare_site_data(spec, cache_dir=cache_dir)
            prepare_seconds[f"{task}/seed{seed}"] = round(time.perf_counter() - tick, 3)
            identity, in_dim = site.encoders["text"], site.train.dims["text"]
            data_info.setdefault(task, {})[f"seed{seed}"] = describe_split(site)
            for variant in chosen:
                record = run_variant(
                    variant, site, train_config=train_config, classifiers=names, seed=seed
                )
                runs.append({"task": task, "seed": seed, **record})
                log.info("%s seed %d %s: %s", task, seed, variant.key, _brief(record["f1"]))
    keys = [v.key for v in chosen]
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
            "test_fraction": DataSpec().test_fraction,
            "classifiers": names,
        },
        "encoder": identity,
        "variants": {v.key: v.label(in_dim) for v in chosen},
        "data": data_info,
        "runs": runs,
        "summary": {
            task: summarize(runs, task=task, keys=keys, classifiers=names) for task in tasks
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
    train = sum(run["train"]["seconds"] for run in runs if "train" in run)
    fit: dict[str, float] = {}
    for run in runs:
        for name, seconds in run["classifier_seconds"].items():
            fit[name] = round(fit.get(name, 0.0) + seconds, 3)
    return {
        "total_seconds": round(total, 3),
        "prepare_data_seconds": prepare_seconds,
        "head_training_seconds": round(train, 3),
        "classifier_seconds_by_name": fit,
    }


def _cell(stats: dict[str, float], *, delta: bool = False) -> str:
    if delta:
        return f"{stats['delta_mean']:+.3f} ± {stats['delta_std']:.3f}"
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def render_markdown(document: dict[str, Any]) -> str:
    """Tables of mean ± std macro-F1 per task (variants x classifiers) and the change vs frozen."""
    config = document["config"]
    names: list[str] = config["classifiers"]
    labels: dict[str, str] = document["variants"]
    seeds = config["seeds"]
    train = config["train"]
    lines = [
        f"# IU X-ray reports: frozen vs projected {config['text_encoder']} embeddings",
        "",
        f"Held-out macro-F1 (mean ± sample std over {len(seeds)} seed(s) {seeds}; each seed is a "
        f"different stratified {1 - config['test_fraction']:.0%}/{config['test_fraction']:.0%} "
        "split, head initialisation and classifier seed). Heads were trained on the labelled "
        f"training reports only ({train['epochs']} epochs, batch {train['batch_size']}, "
        f"lr {train['lr']}, AdamW); classifiers (common.metrics.classifier_suite) were fitted on "
        "the same training reports and scored on the held-out ones. Rows: the frozen encoder "
        "output, then each head preset (layer widths) trained with each loss.",
    ]
    if config["n"] is not None:
        lines.append(f"Subset: {config['n']} reports.")
    for task, summary in document["summary"].items():
        counts = document["data"][task][f"seed{seeds[0]}"]
        lines += ["", f"## Task `{task}`", "", f"Split of seed {seeds[0]}: {_counts(counts)}.", ""]
        rows = [
            {"embeddings": labels[key], **{n: _cell(summary[key][n]) for n in names}}
            for key in summary
        ]
        lines += [format_table(rows, ["embeddings", *names]), ""]
        lines += ["Change vs frozen, paired by seed (mean ± std of the per-seed differences):", ""]
        deltas = [
            {"embeddings": labels[key], **{n: _cell(summary[key][n], delta=True) for n in names}}
            for key in summary
            if key != FROZEN
        ]
        if deltas:
            lines += [format_table(deltas, ["embeddings", *names]), ""]
        lines.append(_headline(summary, labels, names))
    timings = document["timings"]
    machine = document["machine"]
    lines += [
        "",
        "## Run",
        "",
        f"- total {timings['total_seconds']:.0f} s, head training {timings['head_training_seconds']:.0f} s, "
        f"classifier fits {timings['classifier_seconds_by_name']} s",
        f"- encoder: {document['encoder'].get('source', '?')}",
        f"- machine: {machine['cpu']}, {machine['cpu_count']} CPUs, load average "
        f"{machine['load_average_1_5_15_min']}, torch {machine['torch']}, {machine['utc']}",
        "- raw per-seed numbers: the JSON file beside this one",
    ]
    return "\n".join(lines) + "\n"


def _counts(counts: dict[str, dict[str, int]]) -> str:
    return "; ".join(
        f"{part} " + ", ".join(f"{name} {value}" for name, value in values.items())
        for part, values in counts.items()
    )


def _headline(
    summary: dict[str, dict[str, dict[str, float]]], labels: dict[str, str], names: list[str]
) -> str:
    """Best frozen classifier against the best (variant, classifier) cell, by mean F1."""
    frozen_name = max(names, key=lambda n: summary[FROZEN][n]["mean"])
    best_key, best_name = max(
        ((key, n) for key in summary for n in names), key=lambda kn: summary[kn[0]][kn[1]]["mean"]
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
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
    )
    print(render_markdown(document))
    return 0


if __name__ == "__main__":
    sys.exit(main())
