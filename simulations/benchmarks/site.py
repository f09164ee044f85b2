"""Site compute per packaged encoder and per head preset: embedding items/s, head training samples/s, DP cost."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from common.config import TrainConfig
from common.heads import HEAD_PRESETS
from common.training import build_head_model, train_head
from simulations.benchmarks.dp import synthetic_data, time_baseline, time_private
from simulations.benchmarks.embedding import sample_images, sample_texts
from simulations.benchmarks.results import RESULTS_DIR, write_results
from simulations.experiments.machine import load_average, machine_info

ENCODERS: tuple[tuple[str, str, int | None], ...] = (
    ("minilm", "text", None),
    ("mobilenetv2", "image", 128),
    ("mobilenetv2", "image", 224),
    ("efficientnet-lite0", "image", 128),
    ("efficientnet-lite0", "image", 224),
)
N_TEXTS, N_IMAGES, BATCH_SIZE, REPEATS, EPOCHS, DP_EPOCHS = 64, 32, 32, 3, 2, 2


def median_seconds(work: Any, *, repeats: int) -> list[float]:
    """Wall seconds of ``repeats`` calls after one warm-up call."""
    work()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(round(time.perf_counter() - started, 4))
    return times


def bench_encoder(
    spec: str, modality: str, image_size: int | None, *, n: int, repeats: int
) -> dict[str, Any]:
    """Encoder.embed() items/s on report-like texts or 320 px grayscale images (resized inside)."""
    from common.encoders import load_encoder
    from common.errors import ConfigError

    started = time.perf_counter()
    try:
        encoder = load_encoder(spec, modality=modality, image_size=image_size)
    except ConfigError as exc:  # an optional encoder whose package is not installed
        return {
            "encoder": spec,
            "modality": modality,
            "image_size": image_size,
            "unavailable": str(exc),
        }
    load_seconds = time.perf_counter() - started
    items: list[Any] = sample_texts(n) if modality == "text" else sample_images(n)
    times = median_seconds(lambda: encoder.embed(items, batch_size=BATCH_SIZE), repeats=repeats)
    return {
        "encoder": spec,
        "modality": modality,
        "image_size": image_size,
        "dim": int(encoder.dim),
        "items": n,
        "load_seconds": round(load_seconds, 2),
        "seconds": times,
        "items_per_s": round(n / statistics.median(times), 1),
    }


def bench_head(preset: str, *, repeats: int, ledger_dir: Path) -> dict[str, Any]:
    """One head preset: non-private InfoNCE and proxy training, and DP-SGD (ghost) on proxy."""
    data = synthetic_data()
    # no validation hold-out: the timed loop is training alone, as under DP-SGD (per-epoch
    # validation scoring inflated the non-private time, most for the aligned head)
    infonce = TrainConfig(loss="infonce", epochs=EPOCHS, batch_size=256, validation_fraction=0.0)

    def train_infonce() -> float:
        model = build_head_model(dims=data.dims, head_config=HEAD_PRESETS[preset], loss="infonce")
        return train_head(model, data, infonce).samples_per_second

    train_infonce()  # warm-up
    infonce_rates = [train_infonce() for _ in range(repeats)]
    proxy = TrainConfig(loss="proxy", epochs=DP_EPOCHS, batch_size=256, validation_fraction=0.0)
    time_private(data, proxy, "ghost", ledger_dir, head=preset)  # warm-up
    time_baseline(data, proxy, head=preset)
    private, baseline = [], []
    for _ in range(repeats):  # interleaved: the ratio compares runs under the same load
        run = time_private(data, proxy, "ghost", ledger_dir, head=preset)
        private.append(run.samples / run.loop_seconds)
        run = time_baseline(data, proxy, head=preset)
        baseline.append(run.samples / run.loop_seconds)
    model = build_head_model(dims=data.dims, head_config=HEAD_PRESETS[preset], loss="infonce")
    return {
        "head": preset,
        "parameters": int(sum(p.numel() for p in model.head.parameters())),
        "infonce_samples_per_s": round(statistics.median(infonce_rates), 1),
        "proxy_samples_per_s": round(statistics.median(baseline), 1),
        "proxy_dp_samples_per_s": round(statistics.median(private), 1),
        "dp_overhead": round(statistics.median(baseline) / statistics.median(private), 2),
    }


def run(
    *,
    encoders: Sequence[tuple[str, str, int | None]] = ENCODERS,
    presets: Sequence[str] = tuple(HEAD_PRESETS),
    repeats: int = REPEATS,
    n_texts: int = N_TEXTS,
    n_images: int = N_IMAGES,
) -> dict[str, Any]:
    """Every encoder (default torch threads) and every head preset (1 thread, as a site trains)."""
    machine = machine_info()
    rows = [
        bench_encoder(
            spec,
            modality,
            size,
            n=n_texts if modality == "text" else n_images,
            repeats=repeats,
        )
        for spec, modality, size in encoders
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as ledger:
            heads = [bench_head(p, repeats=repeats, ledger_dir=Path(ledger)) for p in presets]
    finally:
        torch.set_num_threads(threads)
    machine["load_average_after"] = load_average()
    return {
        "machine": machine,
        "repeats": repeats,
        "encoders": rows,
        "heads": heads,
        "setup": {
            "embedding_batch_size": BATCH_SIZE,
            "head_examples": len(synthetic_data().ids),
            "head_batch_size": 256,
            "infonce_epochs": EPOCHS,
            "proxy_epochs": DP_EPOCHS,
            "dp": "Opacus ghost clipping, sigma 1.0, C 1.0, Poisson sampling",
        },
    }


def render_markdown(result: Mapping[str, Any]) -> str:
    """The result as a Markdown page."""
    setup = result["setup"]
    lines = [
        "# Site compute",
        "",
        f"## Embedding throughput (Encoder.embed, batch {setup['embedding_batch_size']}, "
        f"median of {result['repeats']} after a warm-up)",
        "",
        "| encoder | modality | input px | dim | items | load s | items/s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['encoder']} | {r['modality']} | {r['image_size'] or '-'} | {r['dim']} | {r['items']} "
        f"| {r['load_seconds']:.1f} | {r['items_per_s']:.1f} |"
        for r in result["encoders"]
        if "unavailable" not in r
    ]
    lines += [
        f"| {r['encoder']} | {r['modality']} | {r['image_size'] or '-'} | - | - | - | not installed |"
        for r in result["encoders"]
        if "unavailable" in r
    ]
    lines += [
        "",
        f"## Head training per preset (1 thread, {setup['head_examples']} examples of "
        f"1280+384-d embeddings, batch {setup['head_batch_size']}, median of {result['repeats']})",
        "",
        "| head | head parameters | InfoNCE samples/s | proxy samples/s | proxy DP-SGD samples/s | DP overhead |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {h['head']} | {h['parameters']:,} | {h['infonce_samples_per_s']:,.0f} | "
        f"{h['proxy_samples_per_s']:,.0f} | {h['proxy_dp_samples_per_s']:,.0f} | {h['dp_overhead']:.2f}x |"
        for h in result["heads"]
    ]
    lines += [
        "",
        f"- DP: {setup['dp']}; overhead = non-private / DP samples per second of the training loop, "
        "interleaved repeats in the same run",
        *[
            f"- {name} was not measured: {reason}"
            for name, reason in {
                r["encoder"]: r["unavailable"] for r in result["encoders"] if "unavailable" in r
            }.items()
        ],
        "- texts: synthetic report sentences (1-12 each); images: 320x320 grayscale arrays resized by "
        "the encoder",
        f"- machine: {result['machine']} (shared with other sessions: see the load averages)",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    args = parser.parse_args(argv)
    result = run(repeats=args.repeats)
    write_results(args.out, "bench_site", result, render_markdown(result))
    sys.stdout.write(render_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
