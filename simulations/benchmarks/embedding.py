"""Embedding speed at a site: ``fedembed embed`` end to end against the fastest bare model loop.

In one process and one sitting, on the same inputs (distinct small PNGs and 20-40-word reports
written to disk, each with its manifest):

- bare loops: the packaged network alone on inputs decoded, resized / tokenised and batched
  beforehand, in each form this machine offers (torch fp32 and, where the CPU has native
  bfloat16, bf16 autocast; channels-last for the CNN; for the CNN also ONNX Runtime fp32 where
  installed), at batch 32 and 64;
- end to end: ``fedembed embed`` (the CLI's code path, in this process, a fresh cache each time):
  model loading, manifest reading and hashing, decoding, preprocessing, the network, writing
  the cache; then the same command on the filled cache;
- fidelity: per-item cosine between each reduced or other-backend form's embedding and torch's
  fp32 one, on these inputs and on synthetic-radiology's images.

Repeats are interleaved (bare, end to end, ...); rates come from medians; the load average is
recorded around each measurement. Run: ``python -m simulations.benchmarks.embedding``.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.encoders import HFTextEncoder, MobileNetV2Encoder, load_encoder
from common.encoders.onnx import OnnxNetwork, onnxruntime_enabled
from common.encoders.runtime import FIDELITY_MIN_COSINE, Runtime, bf16_native
from simulations.benchmarks.results import (
    RESULTS_DIR,
    EncoderReport,
    markdown_appendix,
    write_results,
)
from simulations.experiments.machine import load_average, machine_info

N_IMAGES, N_TEXTS, IMAGE_PX, ENCODER_SIZE, REPEATS = 3000, 3000, 96, 224, 3
BATCH_SIZES = (32, 64)
TARGETS = {"image": 100.0, "text": 180.0}  # items/s end to end on an idle machine (issue 17)
TARGET_RATIO = 0.9

_WORDS = (
    "the heart size is normal and lungs are clear no focal consolidation pneumothorax or pleural "
    "effusion there a small left right basilar opacity which may represent atelectasis early "
    "pneumonia mild cardiomegaly unchanged from prior study degenerative changes of thoracic spine "
    "calcified granuloma in upper lobe sternotomy wires mediastinal clips intact interval removal "
    "internal jugular central venous catheter pulmonary vascularity within limits impression acute "
    "cardiopulmonary abnormality stable chronic findings hyperinflated emphysema nodule follow-up"
).split()


def sample_texts(n: int, *, seed: int = 0) -> list[str]:
    """Distinct report-like texts of 20-40 words, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    texts: dict[str, None] = {}
    while len(texts) < n:
        words = rng.choice(_WORDS, size=int(rng.integers(20, 41)))
        texts[" ".join(words).capitalize() + "."] = None
    return list(texts)


def sample_images(n: int, *, size: int = 320, seed: int = 0) -> list[np.ndarray]:
    """Grey float32 images in [0, 1] (blocky smooth noise), deterministic for a seed."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((n, size // 16, size // 16), dtype=np.float32)
    return [np.kron(image, np.ones((16, 16), dtype=np.float32)) for image in coarse]


@dataclass
class Timing:
    """Repeated wall / CPU seconds of one way of embedding ``items`` inputs."""

    label: str
    items: int
    precision: str = ""  # a bare loop's form: fp32 / bf16 (torch) or onnxruntime (fp32)
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    load: list[list[float]] = field(default_factory=list)  # 1-min load average before each

    @property
    def rate(self) -> float:
        return self.items / statistics.median(self.wall)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "items_per_s": round(self.rate, 1)}


@dataclass
class EncoderResult:
    """One encoder: the bare loops, the end-to-end runs, the cached re-run and the fidelity."""

    encoder: str
    modality: str
    precision: str  # the form ``auto`` chose: fp32 / bf16 (torch) or onnxruntime
    probe_fidelity: dict[str, float] | None
    bare: list[Timing] = field(default_factory=list)
    end_to_end: Timing | None = None
    cached: Timing | None = None
    fidelity: dict[str, dict[str, float]] = field(default_factory=dict)

    def best_bare(self, precision: str | None = None) -> Timing:
        pool = [t for t in self.bare if precision in (None, t.precision)]
        return max(pool, key=lambda t: t.rate)

    def summary(self) -> dict[str, Any]:
        assert self.end_to_end is not None and self.cached is not None
        e2e = self.end_to_end.rate
        same, fastest = self.best_bare(self.precision), self.best_bare()
        return {
            "end_to_end_items_per_s": round(e2e, 1),
            "best_bare_same_precision": same.label,
            "best_bare_same_precision_items_per_s": round(same.rate, 1),
            "ratio_same_precision": round(e2e / same.rate, 3),
            "fastest_bare": fastest.label,
            "fastest_bare_items_per_s": round(fastest.rate, 1),
            "ratio_fastest": round(e2e / fastest.rate, 3),
            "cached_rerun_speedup": round(
                statistics.median(self.end_to_end.wall) / statistics.median(self.cached.wall), 1
            ),
            "target_items_per_s": TARGETS[self.modality],
            "meets_speed_target": e2e >= TARGETS[self.modality],
            "meets_ratio_target": e2e / same.rate >= TARGET_RATIO,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "encoder": self.encoder,
            "modality": self.modality,
            "precision_auto_chose": self.precision,
            "probe_fidelity": self.probe_fidelity,
            "bare": [t.to_dict() for t in self.bare],
            "end_to_end": None if self.end_to_end is None else self.end_to_end.to_dict(),
            "cached": None if self.cached is None else self.cached.to_dict(),
            "fidelity": self.fidelity,
            "summary": self.summary(),
        }


def write_inputs(root: Path, *, n_images: int, n_texts: int, seed: int = 0) -> dict[str, Path]:
    """Distinct grey PNGs of ``IMAGE_PX`` px and distinct 20-40-word reports, with a manifest each."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_images):
        coarse = np.kron(rng.random((12, 12)), np.ones((IMAGE_PX // 12, IMAGE_PX // 12)))
        pixels = (coarse * 200 + rng.random((IMAGE_PX, IMAGE_PX)) * 55).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        rows.append([f"i{i}", f"images/{i}.png"])
    _write_csv(root / "images.csv", ["id", "image"], rows)
    texts: set[str] = set()
    while len(texts) < n_texts:
        words = rng.choice(_WORDS, size=int(rng.integers(20, 41)))
        texts.add(" ".join(words).capitalize() + ".")
    _write_csv(
        root / "texts.csv", ["id", "text"], [[f"t{i}", t] for i, t in enumerate(sorted(texts))]
    )
    return {"image": root / "images.csv", "text": root / "texts.csv"}


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _timed(timing: Timing, work: Callable[[], object]) -> None:
    timing.load.append([round(v, 2) for v in os.getloadavg()])
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    timing.wall.append(round(time.perf_counter() - wall, 3))
    timing.cpu.append(round(time.process_time() - cpu, 3))


def _forms() -> list[str]:
    return ["fp32", "bf16"] if bf16_native("cpu") else ["fp32"]


def _bare_image_loops(
    encoder: MobileNetV2Encoder, manifest: Path
) -> dict[str, Callable[[], object]]:
    from common.data.manifest import read_manifest

    refs = read_manifest(manifest).dataset.images or []
    pixels = encoder.preprocess([ref.load() for ref in refs])  # decoded and resized beforehand
    nhwc = pixels.contiguous(memory_format=torch.channels_last)  # torch's fastest layout
    network = encoder.model.features  # already channels-last (the encoder's setup)
    loops: dict[str, Callable[[], object]] = {}
    for precision in _forms():
        for size in BATCH_SIZES:
            batches = [nhwc[i : i + size] for i in range(0, len(nhwc), size)]

            def loop(batches: list[torch.Tensor] = batches, precision: str = precision) -> None:
                with torch.inference_mode(), Runtime("cpu", precision).autocast():
                    for batch in batches:
                        network(batch).float().mean(dim=(2, 3))

            loops[f"bare network, {precision} channels-last, batch {size}"] = loop
    if onnxruntime_enabled():
        onnx = OnnxNetwork(
            encoder.model, encoder.forward_pixels, pixels[:2], threads=torch.get_num_threads()
        )
        for size in BATCH_SIZES:
            batches = [pixels[i : i + size].contiguous() for i in range(0, len(pixels), size)]
            # NCHW, as the encoder hands ONNX Runtime

            def run_onnx(batches: list[torch.Tensor] = batches) -> None:
                for batch in batches:
                    onnx(batch)

            loops[f"bare network, onnxruntime fp32, batch {size}"] = run_onnx
    return loops


def _bare_text_loops(encoder: HFTextEncoder, manifest: Path) -> dict[str, Callable[[], object]]:
    from common.data.manifest import read_manifest

    texts = read_manifest(manifest).dataset.texts or []
    loops: dict[str, Callable[[], object]] = {}
    for precision in _forms():
        for size in BATCH_SIZES:
            plan = encoder.plan_batches(texts, size)  # most tokens first, as embed() batches them
            batches = [encoder.tokenize([texts[i] for i in index]) for index in plan]

            def loop(batches: list[Any] = batches, precision: str = precision) -> None:
                with torch.inference_mode(), Runtime("cpu", precision).autocast():
                    for batch in batches:
                        encoder.model(**batch).last_hidden_state.float()

            loops[f"bare model, {precision}, batch {size}, pre-tokenised"] = loop
    return loops


def _fedembed_embed(modality: str, manifest: Path, cache: Path) -> Callable[[], object]:
    from common.pipeline import forget_loaded_encoders
    from simulations.cli.app import main as fedembed

    other = "--text-encoder" if modality == "image" else "--image-encoder"
    argv = ["embed", "--data", str(manifest), other, "none", "--test-fraction", "0"]
    argv += ["--encoder-image-size", str(ENCODER_SIZE), "--cache-dir", str(cache)]

    def run() -> None:
        if cache.exists() and not any(cache.iterdir()):
            forget_loaded_encoders()  # a fresh cache: the model is loaded again, as in a new process
        if fedembed(argv) != 0:
            raise RuntimeError(f"fedembed {' '.join(argv)} failed")

    return run


def _cosines(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {
        "items": len(cos),
        "min_cosine": round(float(cos.min()), 5),
        "median_cosine": round(float(np.median(cos)), 5),
        "share_below_bar": round(float((cos < FIDELITY_MIN_COSINE).mean()), 4),
    }


def _fidelity(encoder: Any, items: list[Any], form: Runtime) -> dict[str, float]:
    """Per-item cosines of ``form``'s embeddings to torch fp32's."""
    saved = encoder.runtime
    try:
        encoder.runtime = Runtime("cpu", "fp32")
        exact = encoder.embed(items)
        encoder.runtime = form
        other = encoder.embed(items)
    finally:
        encoder.runtime = saved
    return _cosines(exact, other)


def _other_forms(encoder: Any) -> dict[str, Runtime]:
    """The forms whose fidelity to torch fp32 is measured: bf16 where native, and ONNX Runtime
    where the encoder runs on it."""
    forms = {"bf16": Runtime("cpu", "bf16")} if bf16_native("cpu") else {}
    if encoder.runtime.backend == "onnxruntime":
        forms["onnxruntime"] = encoder.runtime
    return forms


def bench_encoder(
    modality: str, manifest: Path, work: Path, *, repeats: int, fidelity_items: int
) -> EncoderResult:
    from common.data.manifest import read_manifest

    name = "mobilenetv2" if modality == "image" else "minilm"
    image_size = ENCODER_SIZE if modality == "image" else None
    encoder = load_encoder(name, image_size=image_size)
    runtime = encoder.runtime
    form = runtime.precision if runtime.backend == "torch" else runtime.backend
    result = EncoderResult(name, modality, form, probe_fidelity=encoder.fidelity)
    loops = (
        _bare_image_loops(encoder, manifest)  # type: ignore[arg-type]
        if modality == "image"
        else _bare_text_loops(encoder, manifest)  # type: ignore[arg-type]
    )
    count = len(read_manifest(manifest).dataset)
    result.bare = [
        Timing(label, count, precision=label.split(", ")[1].split()[0]) for label in loops
    ]  # the label's second part names the form
    result.end_to_end = Timing("fedembed embed, end to end (fresh cache)", count)
    result.cached = Timing("fedembed embed, everything cached", count)
    for loop in loops.values():  # warm-up: oneDNN builds its kernels once per shape
        loop()
    for repeat in range(repeats):
        for timing, loop in zip(result.bare, loops.values(), strict=True):
            _timed(timing, loop)
        cache = work / f"cache-{modality}-{repeat}"
        cache.mkdir()
        _timed(result.end_to_end, _fedembed_embed(modality, manifest, cache))
        _timed(result.cached, _fedembed_embed(modality, manifest, cache))
    forms = _other_forms(encoder)
    if forms:
        dataset = read_manifest(manifest).dataset
        items: list[Any] = (
            [ref.load() for ref in (dataset.images or [])[:fidelity_items]]
            if modality == "image"
            else list(dataset.texts or [])[:fidelity_items]
        )
        pictures: list[Any] = []
        if modality == "image":
            from common.config import DataSpec
            from common.pipeline import load_site_dataset

            n = min(500, fidelity_items)
            radiology = load_site_dataset(DataSpec(dataset="synthetic-radiology", n=n))
            pictures = [ref.load() for ref in radiology.images or []]
        for label, other in forms.items():
            result.fidelity[f"{label}, benchmark inputs"] = _fidelity(encoder, items, other)
            if pictures:
                result.fidelity[f"{label}, synthetic-radiology images"] = _fidelity(
                    encoder, pictures, other
                )
    return result


BenchReport = EncoderReport[EncoderResult]


def run(
    *,
    n_images: int = N_IMAGES,
    n_texts: int = N_TEXTS,
    repeats: int = REPEATS,
    fidelity_items: int = 1000,
    modalities: Sequence[str] = ("image", "text"),
) -> BenchReport:
    report = BenchReport(
        machine=machine_info(),
        setup={
            "images": n_images,
            "image_file_px": IMAGE_PX,
            "encoder_image_size": ENCODER_SIZE,
            "texts": n_texts,
            "text_words": "20-40",
            "repeats": repeats,
            "bf16_native": bf16_native("cpu"),
            "torch_threads": torch.get_num_threads(),
        },
    )
    with tempfile.TemporaryDirectory(prefix="fedembed-bench-embed-") as tmp:
        manifests = write_inputs(Path(tmp), n_images=n_images, n_texts=n_texts)
        for modality in modalities:
            report.encoders.append(
                bench_encoder(
                    modality,
                    manifests[modality],
                    Path(tmp),
                    repeats=repeats,
                    fidelity_items=fidelity_items,
                )
            )
    report.machine["load_average_after"] = load_average()
    report.notes += [
        f"{repeats} interleaved repeats after one warm-up of each bare loop; items/s from the "
        "median wall time; the load average (1 min) before each timed call is in the JSON",
        "end to end = the `fedembed embed` command's code path called in this process with a "
        "fresh cache: encoder load (a new model each repeat), manifest read with every file "
        "hashed, decoding (one batch ahead, in a background thread), resize and normalise or "
        "tokenise, the network, cache shards written; python start-up is not included",
        "bare = the same packaged network on the same inputs decoded, preprocessed and batched "
        "before timing; ratio = end-to-end / bare items per second",
        "same form: the fastest bare loop in the form `auto` chose for the encoder (torch fp32 "
        "or bf16, or ONNX Runtime fp32); fastest: the fastest bare loop in any form, even one "
        f"whose embeddings miss the fidelity bar (cosine >= {FIDELITY_MIN_COSINE} to fp32 for "
        "every item)",
        "ONNX Runtime loops run the encoder's own export (common.encoders.onnx.OnnxNetwork) on "
        "contiguous NCHW batches",
        "allocator: every loop runs with the encoders' glibc malloc setting (common.encoders."
        "runtime.tune_allocator), which the bare loops share because they run in this process",
    ]
    return report


def render_markdown(report: BenchReport) -> str:
    lines = [
        "# Embedding speed: `fedembed embed` end to end vs the fastest bare loop",
        "",
        "| encoder | auto's form | end to end items/s | best bare, same form | ratio | "
        "fastest bare (any form) | ratio | cached re-run | target items/s | meets |",
        "| --- | --- | ---: | --- | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for e in report.encoders:
        s = e.summary()
        lines.append(
            f"| {e.encoder} | {e.precision} | {s['end_to_end_items_per_s']} | "
            f"{s['best_bare_same_precision']}: {s['best_bare_same_precision_items_per_s']} | "
            f"{s['ratio_same_precision']:.2f}x | {s['fastest_bare']}: {s['fastest_bare_items_per_s']} "
            f"| {s['ratio_fastest']:.2f}x | {s['cached_rerun_speedup']}x faster | "
            f"{s['target_items_per_s']:.0f} | "
            f"{'yes' if s['meets_speed_target'] and s['meets_ratio_target'] else 'no'} |"
        )
    lines += [
        "",
        "## Every loop",
        "",
        "| encoder | loop | items/s | median wall s | median CPU s |",
    ]
    lines.append("| --- | --- | ---: | ---: | ---: |")
    for e in report.encoders:
        for t in [*e.bare, e.end_to_end, e.cached]:
            assert t is not None
            lines.append(
                f"| {e.encoder} | {t.label} | {t.rate:.1f} | {statistics.median(t.wall):.2f} | "
                f"{statistics.median(t.cpu):.2f} |"
            )
    lines += ["", "## Fidelity (per-item cosine to the torch fp32 embedding)", ""]
    lines += ["| encoder | form, inputs | items | min | median | share below the bar |"]
    lines.append("| --- | --- | ---: | ---: | ---: | ---: |")
    for e in report.encoders:
        probe = e.probe_fidelity or {}
        if "min_cosine" in probe:
            lines.append(
                f"| {e.encoder} | bf16, auto's probe | - | {probe['min_cosine']:.5f} | "
                f"{probe['median_cosine']:.5f} | - |"
            )
        if "onnxruntime_min_cosine" in probe:
            lines.append(
                f"| {e.encoder} | onnxruntime, auto's probe | - | "
                f"{probe['onnxruntime_min_cosine']:.5f} | - | - |"
            )
        for inputs, f in e.fidelity.items():
            lines.append(
                f"| {e.encoder} | {inputs} | {f['items']} | {f['min_cosine']:.5f} | "
                f"{f['median_cosine']:.5f} | {f['share_below_bar']:.2%} |"
            )
    lines += markdown_appendix(setup=report.setup, machine=report.machine, notes=report.notes)
    return "\n".join(lines) + "\n"


def write_report(report: BenchReport, out_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
    """Write bench_embedding.json and bench_embedding.md atomically; returns their paths."""
    return write_results(out_dir, "bench_embedding", report.to_dict(), render_markdown(report))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=N_IMAGES)
    parser.add_argument("--texts", type=int, default=N_TEXTS)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--fidelity-items", type=int, default=1000)
    parser.add_argument("--modalities", default="image,text")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    report = run(
        n_images=args.images,
        n_texts=args.texts,
        repeats=args.repeats,
        fidelity_items=args.fidelity_items,
        modalities=[m for m in args.modalities.split(",") if m],
    )
    for path in write_report(report, args.out):
        print(path)
    sys.stdout.write(render_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
