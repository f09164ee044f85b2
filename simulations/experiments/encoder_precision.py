"""Encoder precision fidelity, fp32 vs bf16 embeddings, paired over seeds: `python -m simulations.experiments.encoder_precision`.

Issue 17's fidelity bar: the downstream metrics (R@5, zero-shot AUROC, probe F1) of heads trained
on fp32 and on reduced-precision (bf16) embeddings are within seed noise, on synthetic-radiology
and iu-xray-reports.

Per dataset and precision the data is embedded once (``embed_site``, through the embedding cache;
the precision is part of the cache key, so fp32 and bf16 never mix). Then, per seed, one site's
head is trained and scored as ``fedembed train`` does it (``simulations.cli.site.cmd_train``):
``prepare_site_data`` splits the rows (stratified ``test_fraction``), the head is built from the
product defaults (run-config head preset and layout, ``TrainConfig``'s loss, batch size, learning
rate, closed-form start, validation share and patience) with a modest epoch budget, trained on the
training split and scored by ``evaluate_head`` on the held-out split (the frozen closed-form
baselines are left out: they do not depend on the head).

Seeds: the data itself is fixed (generation seed 0, the whole of iu-xray-reports), so that it is
embedded once; seed ``s`` sets the held-out split (``split_seed``) and the head's initialisation,
validation share and shuffling (``TrainConfig.seed``) together. fp32 and bf16 of one seed use the
same split (checked: the held-out ids' digest) and the same training seed: the pairs differ only in
the embeddings' precision.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from common.config import DataSpec, RunSettings, TrainConfig
from common.embedding import EmbeddedDataset
from common.encoders.onnx import ONNX_ENV
from common.errors import ConfigError
from common.metrics import format_table
from simulations.benchmarks.results import write_results
from simulations.experiments.demo import EXAMPLES as DEMO_EXAMPLES
from simulations.experiments.demo import TRAINING as DEMO_TRAINING
from simulations.experiments.machine import load_average, machine_info
from simulations.experiments.seed_summary import confidence_interval

RESULT_NAME = "encoder_precision"
OUT_DIR = Path("docs/results/encoder_precision")
CACHE_DIR = Path("runs/exp-encoder-precision/cache")
METRICS = ("mean_R@5", "zs_auroc", "probe_f1_macro")
"""Issue 17's downstream metrics, as ``common.evaluation`` names them (R@5: the mean of
image->text and text->image); each dataset is checked on those it has."""
FROZEN_PROBE = "frozen_probe_f1_macro"
"""Also compared: the linear probe's macro F1 on the frozen embeddings themselves (no head: only
the held-out split varies with the seed), the embeddings' precision seen without head training."""
PRECISIONS = ("fp32", "bf16")
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_EPOCHS = 10
"""Training epochs per head: ``TrainConfig``'s per-round default (``fedembed train`` runs 30;
early stopping on the validation share usually ends sooner)."""
DEVICE = "cpu"
DEMO_IMAGE_SIZE = int(DEMO_TRAINING["encoder-image-size"])
RULE = (
    "within seed noise: |mean paired difference (bf16 - fp32)| <= the fp32 seed-to-seed sd "
    "and the 95% t-interval of the mean difference contains 0"
)


@dataclass(frozen=True)
class DatasetConfig:
    """One dataset: its DataSpec fields (everything else is DataSpec's default)."""

    name: str
    dataset: str
    task: str | None = None
    n: int | None = None  # None: the generator's default size / the whole dataset
    image_encoder: str = DataSpec().image_encoder
    text_encoder: str = DataSpec().text_encoder
    encoder_image_size: int | None = None
    note: str = ""

    def spec(self, precision: str, *, split_seed: int = 0) -> DataSpec:
        return DataSpec(
            dataset=self.dataset,
            n=self.n,
            task=self.task,
            image_encoder=self.image_encoder,
            text_encoder=self.text_encoder,
            encoder_image_size=self.encoder_image_size,
            encoder_precision=precision,
            encoder_device=DEVICE,
            split_seed=split_seed,
        )


DATASETS: dict[str, DatasetConfig] = {
    c.name: c
    for c in (
        DatasetConfig(
            "synthetic-radiology",
            "synthetic-radiology",
            n=DEMO_EXAMPLES,
            encoder_image_size=DEMO_IMAGE_SIZE,
            note=f"images (MobileNetV2 at the demo's {DEMO_IMAGE_SIZE} px) + reports (MiniLM); "
            f"the demo's {DEMO_EXAMPLES} examples, generation seed 0",
        ),
        DatasetConfig(
            "iu-xray-reports",
            "iu-xray-reports",
            note="text only (MiniLM on the reports); the default task (abnormal); every report",
        ),
    )
}


# ----- precisions -----------------------------------------------------------------------------


def available_precisions(device: str = DEVICE) -> tuple[list[str], str]:
    """The precisions this machine can compare, and a note when bf16 is left out."""
    from common.encoders.runtime import bf16_native

    if bf16_native(device):
        return list(PRECISIONS), ""
    return ["fp32"], f"bf16 not run: this {device} has no native bfloat16 (bf16_native is False)"


def auto_resolution(config: DatasetConfig) -> dict[str, dict[str, Any]]:
    """What ``precision="auto"`` resolves to for each encoder ``config`` uses, at its settings:
    the encoder's ``runtime.precision`` and the fidelity probe's cosines (None: no probe ran)."""
    from common.encoders import load_encoder

    spec = config.spec("auto")
    used = {"text": config.text_encoder}
    if config.dataset == "synthetic-radiology":  # iu-xray-reports has no images
        used = {"image": config.image_encoder, **used}
    resolved: dict[str, dict[str, Any]] = {}
    for modality, name in used.items():
        encoder = load_encoder(
            name,
            modality=modality,
            image_size=spec.encoder_image_size,
            max_length=spec.max_length,
            precision="auto",
            device=DEVICE,
        )
        resolved[modality] = {
            "encoder": name,
            "precision": encoder.runtime.precision,
            "device": encoder.runtime.device,
            "fidelity": encoder.fidelity,
        }
    return resolved


# ----- embeddings -----------------------------------------------------------------------------


def embed(config: DatasetConfig, precision: str, cache_dir: Path) -> dict[str, Any]:
    """Embed ``config``'s data once at ``precision`` (cached); the embeddings and what it cost."""
    from common.pipeline import embed_site

    started = time.perf_counter()
    embedded, report, identities = embed_site(config.spec(precision), cache_dir=cache_dir)
    return {
        "embedded": embedded,
        "seconds": time.perf_counter() - started,
        "encoded": {m: s.misses for m, s in report.stats.items()},
        "cached": {m: s.hits for m, s in report.stats.items()},
        "runtimes": {
            m: {k: identity.get(k) for k in ("device", "precision", "backend")}
            for m, identity in identities.items()
        },
    }


def cosine_stats(exact: EmbeddedDataset, reduced: EmbeddedDataset) -> dict[str, dict[str, float]]:
    """Per modality (and the class prompts' embeddings): the per-item cosine between ``reduced``
    and ``exact`` embeddings of the same rows (matched by id): min, 1st percentile, median."""
    if sorted(exact.ids) != sorted(reduced.ids):
        raise ConfigError("cosine_stats: the two embeddings hold different rows")
    order = {row: i for i, row in enumerate(reduced.ids)}
    index = np.asarray([order[row] for row in exact.ids], dtype=np.int64)
    out: dict[str, dict[str, float]] = {}
    for modality in ("image", "text", "prompts"):
        a, b = getattr(exact, modality), getattr(reduced, modality)
        if a is None or b is None:
            continue
        if modality != "prompts":
            b = b[index]
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        cos = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        out[modality] = {
            "items": int(cos.size),
            "min": float(cos.min()),
            "p01": float(np.percentile(cos, 1)),
            "median": float(np.median(cos)),
        }
    return out


# ----- one head -------------------------------------------------------------------------------


def ids_digest(data: EmbeddedDataset) -> str:
    """A short digest of the rows' ids (both precisions' heads are scored on the same rows)."""
    return hashlib.sha256("\n".join(data.ids).encode()).hexdigest()[:16]


def train_and_score(
    config: DatasetConfig, precision: str, *, seed: int, epochs: int, cache_dir: Path
) -> dict[str, Any]:
    """One head as ``fedembed train`` trains it (product defaults, ``epochs``), on ``precision``'s
    embeddings split by ``seed``, scored on the held-out split."""
    from common.evaluation import evaluate_head
    from common.heads import HEAD_PRESETS
    from common.pipeline import prepare_site_data
    from common.training import build_head_model, train_head

    started = time.perf_counter()
    site = prepare_site_data(config.spec(precision, split_seed=seed), cache_dir=cache_dir)
    run = RunSettings()
    train_config = TrainConfig(epochs=epochs, seed=seed)
    model = build_head_model(
        dims=site.train.dims,
        head_config=HEAD_PRESETS[run.head],
        layout=run.layout,
        loss=train_config.loss,
        num_classes=site.train.num_classes or None,
        seed=seed,
    )
    result = train_head(model, site.train, train_config)
    report = evaluate_head(model, site.train, site.test, seed=seed, alignments=())
    projected = report.row("projected")
    frozen = report.row("frozen")
    return {
        "seed": seed,
        "precision": precision,
        "metrics": _finite(projected),
        FROZEN_PROBE: float(frozen["probe_f1_macro"]) if "probe_f1_macro" in frozen else None,
        "epochs_run": result.epochs_run or epochs,
        "train_rows": len(site.train),
        "test_rows": len(site.test),
        "test_ids_sha256": ids_digest(site.test),
        "seconds": time.perf_counter() - started,
    }


def _finite(row: Mapping[str, Any]) -> dict[str, float]:
    return {m: float(row[m]) for m in METRICS if m in row and math.isfinite(float(row[m]))}


# ----- over seeds -----------------------------------------------------------------------------


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample sd (ddof 1; NaN below 2 values)."""
    array = np.asarray(values, dtype=np.float64)
    return {
        "values": array.tolist(),
        "mean": float(array.mean()),
        "sd": float(array.std(ddof=1)) if array.size > 1 else math.nan,
    }


def paired_comparison(fp32: Sequence[float], bf16: Sequence[float]) -> dict[str, Any]:
    """One metric over paired seeds: each side's mean and sd, the differences bf16 - fp32, their
    mean, sd and 95% t-interval, and the verdict by ``RULE`` (undetermined below 2 seeds)."""
    if len(fp32) != len(bf16):
        raise ConfigError(f"paired_comparison: {len(fp32)} fp32 values vs {len(bf16)} bf16")
    diffs = [b - a for a, b in zip(fp32, bf16, strict=True)]
    difference = spread(diffs)
    interval = confidence_interval(diffs)
    exact = spread(fp32)
    noise = exact["sd"]
    covers = interval is not None and interval[0] <= 0.0 <= interval[1]
    if interval is None or not math.isfinite(noise):
        status, within = "undetermined (< 2 seeds)", None
    else:
        within = abs(difference["mean"]) <= noise and covers
        status = "within seed noise" if within else "NOT within seed noise"
    return {
        "n": len(diffs),
        "fp32": exact,
        "bf16": spread(bf16),
        "difference": {**difference, "ci95": interval},
        "seed_sd_fp32": noise,
        "within_seed_noise": within,
        "verdict": status,
    }


def _value(entry: Mapping[str, Any], metric: str) -> float | None:
    """``metric`` of one head's entry: a projected metric, or ``FROZEN_PROBE`` (None: absent)."""
    value = entry.get(FROZEN_PROBE) if metric == FROZEN_PROBE else entry["metrics"].get(metric)
    return None if value is None else float(value)


def summarize(entries: Sequence[Mapping[str, Any]], precisions: Sequence[str]) -> dict[str, Any]:
    """Per metric (``METRICS``, then ``FROZEN_PROBE``): per-precision mean and sd over seeds, and
    (with both precisions) the paired comparison (``paired_comparison``) over the seeds both have."""
    by: dict[str, dict[int, Mapping[str, Any]]] = {p: {} for p in precisions}
    for e in entries:
        by[e["precision"]][e["seed"]] = e
    summary: dict[str, Any] = {}
    for metric in (*METRICS, FROZEN_PROBE):
        per: dict[str, Any] = {}
        for p in precisions:
            values = [v for e in by[p].values() if (v := _value(e, metric)) is not None]
            if values:
                per[p] = spread(values)
        if not per:
            continue
        summary[metric] = {"by_precision": per}
        if set(PRECISIONS) <= set(precisions):
            pairs = {
                s: (a, b)
                for s in sorted(by["fp32"])
                if s in by["bf16"]
                and (a := _value(by["fp32"][s], metric)) is not None
                and (b := _value(by["bf16"][s], metric)) is not None
            }
            if pairs:
                summary[metric]["paired"] = {
                    "seeds": list(pairs),
                    **paired_comparison(
                        [a for a, _ in pairs.values()], [b for _, b in pairs.values()]
                    ),
                }
    return summary


# ----- report ---------------------------------------------------------------------------------


def _pm(s: Mapping[str, Any]) -> str:
    return f"{s['mean']:.4f}" + (f" ± {s['sd']:.4f}" if math.isfinite(s["sd"]) else "")


def _ci(interval: Sequence[float] | None) -> str:
    return "n/a (1 seed)" if interval is None else f"[{interval[0]:+.4f}, {interval[1]:+.4f}]"


def _sd(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else "n/a"


def summary_rows(document: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, result in document["datasets"].items():
        for metric, s in result["summary"].items():
            per = s["by_precision"]
            row: dict[str, Any] = {"dataset": name, "metric": metric}
            for p in PRECISIONS:
                row[f"{p} (mean ± sd)"] = _pm(per[p]) if p in per else "not run"
            paired = s.get("paired")
            if paired is not None:
                d = paired["difference"]
                row |= {
                    "bf16 - fp32 (mean)": f"{d['mean']:+.4f}",
                    "95% CI": _ci(d["ci95"]),
                    "fp32 seed sd": _sd(paired["seed_sd_fp32"]),
                    "verdict": paired["verdict"],
                }
            rows.append(row)
    return rows


def report_markdown(document: Mapping[str, Any]) -> str:
    settings = document["settings"]
    lines = [
        "# Encoder precision: heads trained on fp32 vs bf16 embeddings (issue 17)\n",
        f"Command: `{document['command']}`\n",
        f"Machine: {document['machine']['cpu']}, {document['machine']['cpus']} cores; load "
        f"average (1/5/15 min) at start {document['load_average']['start']}, at end "
        f"{document['load_average'].get('end', 'n/a')}; {document.get('seconds', 0.0):.0f} s "
        "in all.\n",
        "Per dataset and precision the data is embedded once (device cpu; bf16: the encoder "
        "network under bfloat16 autocast). Per seed one site's head is trained as `fedembed train` "
        f"trains it: product defaults (head `{settings['head']}`, layout `{settings['layout']}`, "
        f"loss `{settings['loss']}`, batch {settings['batch_size']}, lr {settings['lr']:g}, "
        f"closed-form start, {settings['validation_fraction']:g} of the training rows as "
        f"validation with patience {settings['patience']}), at most {settings['epochs']} epochs; "
        "scored on the held-out split "
        f"(test-fraction {settings['test_fraction']:g}, stratified). Seed s sets the held-out split "
        "and the head's initialisation, validation share and shuffling together; the data itself "
        "is fixed. fp32 and bf16 of a seed are scored on the same held-out rows with the same "
        f"training seed. Seeds: {settings['seeds']}.\n",
        f"Verdict rule: {RULE}. With few seeds the t-interval is wide (3 seeds: mean ± 4.30 "
        "sd/sqrt(3)): the verdict says the difference cannot be told from seed noise, not that "
        "it is small; read the interval and the per-seed rows with it.\n",
    ]
    if document.get("summaries_recomputed"):
        lines.append(
            "Summaries recomputed from the stored per-seed rows (`--rebuild`) at "
            f"{document['summaries_recomputed']}.\n"
        )
    if document.get("precision_note"):
        lines.append(f"**{document['precision_note']}**\n")
    rows = summary_rows(document)
    if rows:
        lines += [
            "## Summary\n",
            "Projected metrics of the trained heads on the held-out split (`mean_R@5`: the mean "
            "of image->text and text->image recall@5); `frozen_probe_f1_macro` (secondary): the "
            "linear probe on the frozen embeddings themselves, no head, so only the split varies "
            "with the seed.\n",
            format_table(rows, list(rows[0])),
            "",
        ]
    auto_rows = [
        {
            "dataset": name,
            "modality": modality,
            "encoder": r["encoder"],
            "auto resolves to": r["precision"],
            "probe min cosine": "no probe"
            if r["fidelity"] is None
            else f"{r['fidelity'].get('min_cosine', math.nan):.6f}",
            "probe median cosine": ""
            if r["fidelity"] is None
            else f"{r['fidelity'].get('median_cosine', math.nan):.6f}",
        }
        for name, result in document["datasets"].items()
        for modality, r in result["auto"].items()
    ]
    if auto_rows:
        lines += [
            '## What `precision="auto"` resolves to\n',
            '`load_encoder(name, precision="auto")` at the experiment\'s settings: bf16 only if '
            "the device has native bfloat16 and every fidelity-probe item keeps cosine >= "
            f"{document['fidelity_min_cosine']} to fp32.\n",
            format_table(auto_rows, list(auto_rows[0])),
            "",
        ]
    cos_rows = [
        {
            "dataset": name,
            "embeddings": modality,
            "items": c["items"],
            "min cosine": f"{c['min']:.6f}",
            "1st percentile": f"{c['p01']:.6f}",
            "median cosine": f"{c['median']:.6f}",
        }
        for name, result in document["datasets"].items()
        for modality, c in result.get("cosine", {}).items()
    ]
    if cos_rows:
        lines += [
            "## Per-item cosine, bf16 vs fp32 embeddings\n",
            "Each row's bf16 embedding against its fp32 embedding (prompts: the class prompts' "
            "text embeddings).\n",
            format_table(cos_rows, list(cos_rows[0])),
            "",
        ]
    for name, result in document["datasets"].items():
        lines += dataset_markdown(name, result)
    return "\n".join(lines) + "\n"


def dataset_markdown(name: str, result: Mapping[str, Any]) -> list[str]:
    lines = [f"## {name}\n", f"{result['config']['note']}.\n"]
    embed_rows = [
        {
            "precision": p,
            "rows": e["rows"],
            "embedding seconds": f"{e['seconds']:.1f}",
            "encoded now": ", ".join(f"{m} {v}" for m, v in e["encoded"].items()),
            "from cache": ", ".join(f"{m} {v}" for m, v in e["cached"].items()),
        }
        for p, e in result["embedding"].items()
    ]
    lines += [format_table(embed_rows, list(embed_rows[0])), ""]
    per_seed = [
        {
            "seed": e["seed"],
            "precision": e["precision"],
            **{m: f"{e['metrics'][m]:.4f}" for m in METRICS if m in e["metrics"]},
            "frozen probe F1": ""
            if e["frozen_probe_f1_macro"] is None
            else f"{e['frozen_probe_f1_macro']:.4f}",
            "epochs run": e["epochs_run"],
            "train/test rows": f"{e['train_rows']}/{e['test_rows']}",
            "test ids": e["test_ids_sha256"],
            "seconds": f"{e['seconds']:.1f}",
        }
        for e in sorted(result["seeds"], key=lambda e: (e["seed"], e["precision"]))
    ]
    if per_seed:
        lines += [
            "Per seed (projected embeddings; `frozen probe F1`: the probe on the frozen "
            "embeddings of that precision):\n",
            format_table(per_seed, list(per_seed[0])),
            "",
        ]
    return lines


# ----- runner ---------------------------------------------------------------------------------


def run_all(
    *,
    configs: Mapping[str, DatasetConfig],
    seeds: Sequence[int],
    epochs: int,
    out_dir: Path,
    cache_dir: Path,
    precisions: Sequence[str] | None = None,
    command: str = "",
    echo: bool = True,
) -> dict[str, Any]:
    """Every dataset of ``configs``: embed at each precision, train and score a head per seed and
    precision, compare; results written after every dataset."""
    import torch

    from common.encoders.runtime import FIDELITY_MIN_COSINE

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
    started = time.perf_counter()
    note = ""
    if precisions is None:
        precisions, note = available_precisions()
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise ConfigError(f"unknown precision {unknown}: one of {', '.join(PRECISIONS)}")
    run, train = RunSettings(), TrainConfig(epochs=epochs)
    document: dict[str, Any] = {
        "machine": machine_info(),
        "load_average": {"start": load_average()},
        "command": command,
        "precisions": list(precisions),
        "precision_note": note,
        "fidelity_min_cosine": FIDELITY_MIN_COSINE,
        "rule": RULE,
        "settings": {
            "seeds": list(seeds),
            "epochs": epochs,
            "head": run.head,
            "layout": run.layout,
            "loss": train.loss,
            "batch_size": train.batch_size,
            "lr": train.lr,
            "validation_fraction": train.validation_fraction,
            "patience": train.patience,
            "test_fraction": DataSpec().test_fraction,
            "device": DEVICE,
            "seed_controls": "split_seed and TrainConfig.seed (head init, validation share, "
            "shuffling) together; data generation fixed at seed 0",
        },
        "datasets": {},
    }
    for name, config in configs.items():
        result: dict[str, Any] = {
            "config": asdict(config),
            "auto": auto_resolution(config),
            "embedding": {},
            "seeds": [],
        }
        embedded: dict[str, EmbeddedDataset] = {}
        for precision in precisions:
            done = embed(config, precision, cache_dir)
            embedded[precision] = done.pop("embedded")
            result["embedding"][precision] = {**done, "rows": len(embedded[precision])}
            if echo:
                print(
                    f"[{time.strftime('%H:%M:%S')}] {name} {precision}: embedded "
                    f"({done['seconds']:.0f} s)",
                    flush=True,
                )
        if set(PRECISIONS) <= set(embedded):
            result["cosine"] = cosine_stats(embedded["fp32"], embedded["bf16"])
        for seed in seeds:
            for precision in precisions:
                entry = train_and_score(
                    config, precision, seed=seed, epochs=epochs, cache_dir=cache_dir
                )
                result["seeds"].append(entry)
                if echo:
                    shown = ", ".join(f"{m} {v:.4f}" for m, v in entry["metrics"].items())
                    print(
                        f"[{time.strftime('%H:%M:%S')}] {name} seed {seed} {precision}: "
                        f"{shown} ({entry['seconds']:.0f} s)",
                        flush=True,
                    )
        _check_pairing(name, result["seeds"])
        result["summary"] = summarize(result["seeds"], precisions)
        document["datasets"][name] = result
        document["seconds"] = time.perf_counter() - started
        document["load_average"]["end"] = load_average()
        write_results(out_dir, RESULT_NAME, document, report_markdown(document))
    return document


def _check_pairing(name: str, entries: Sequence[Mapping[str, Any]]) -> None:
    """Both precisions of a seed must have been scored on the same held-out rows."""
    digests: dict[int, set[str]] = {}
    for e in entries:
        digests.setdefault(e["seed"], set()).add(e["test_ids_sha256"])
    unpaired = [s for s, d in digests.items() if len(d) > 1]
    if unpaired:
        raise ConfigError(f"{name}: seeds {unpaired} scored different held-out rows per precision")


def rebuild(out_dir: Path) -> dict[str, Any]:
    """Recompute every dataset's summary from its stored per-seed rows, by this module's rules,
    and rewrite the JSON and markdown in ``out_dir``."""
    path = out_dir / f"{RESULT_NAME}.json"
    if not path.exists():
        raise ConfigError(f"--rebuild: {path} does not exist (run the experiment first)")
    document = json.loads(path.read_text(encoding="utf-8"))
    for result in document["datasets"].values():
        result["summary"] = summarize(result["seeds"], document["precisions"])
    document["summaries_recomputed"] = machine_info()["utc"]
    write_results(out_dir, RESULT_NAME, document, report_markdown(document))
    return document


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--datasets", default=",".join(DATASETS), help=f"comma-separated: {', '.join(DATASETS)}"
    )
    parser.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)))
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument(
        "--synthetic-n",
        type=int,
        default=None,
        help=f"synthetic-radiology examples (default: the demo's {DEMO_EXAMPLES})",
    )
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--cache", type=Path, default=CACHE_DIR)
    parser.add_argument(
        "--rebuild",
        action="store_true",
        help="no embedding or training: recompute the summaries and the markdown of --out's "
        "results from their stored per-seed rows",
    )
    args = parser.parse_args(argv)
    # torch fp32 vs torch bf16: keep the CNN off ONNX Runtime (its fp32 equals torch's: cosine
    # 1.00000 in bench_onnx_runtime), so both arms run the same network code
    os.environ[ONNX_ENV] = "0"
    if args.rebuild:
        rebuild(args.out)
        print((args.out / f"{RESULT_NAME}.md").read_text(encoding="utf-8"))
        return
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError as exc:
        raise ConfigError(
            f"--seeds: '{args.seeds}' is not a comma-separated list of integers"
        ) from exc
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        raise ConfigError(f"--datasets: unknown {unknown}; one of {', '.join(DATASETS)}")
    configs = {
        n: replace(DATASETS[n], n=args.synthetic_n)
        if DATASETS[n].dataset == "synthetic-radiology" and args.synthetic_n is not None
        else DATASETS[n]
        for n in names
    }
    command = "python -m simulations.experiments.encoder_precision " + " ".join(
        argv if argv is not None else __import__("sys").argv[1:]
    )
    run_all(
        configs=configs,
        seeds=seeds,
        epochs=args.epochs,
        out_dir=args.out,
        cache_dir=args.cache,
        command=command.strip(),
    )
    print((args.out / f"{RESULT_NAME}.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    from simulations.experiments.entry import run_main

    run_main("encoder_precision", main)
