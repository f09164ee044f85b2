"""Embedding throughput: Encoder.embed() against a bare model loop on the same batches."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.encoders import HFTextEncoder, ImageEncoder, MobileNetV2Encoder, load_encoder
from simulations.benchmarks.results import RESULTS_DIR, write_results
from simulations.experiments.machine import load_average, machine_info

N_TEXTS, N_IMAGES, BATCH_SIZE, REPEATS, IMAGE_SIZE = 128, 64, 32, 9, 224
_PHRASES = (
    "The heart size is normal.",
    "The lungs are clear.",
    "No pneumothorax or pleural effusion.",
    "There is a small left pleural effusion.",
    "Mild cardiomegaly is unchanged from the prior study.",
    "Patchy opacity in the right lower lobe may represent atelectasis or early pneumonia.",
    "Degenerative changes of the thoracic spine.",
    "No acute cardiopulmonary abnormality.",
    "Calcified granuloma in the left upper lobe.",
    "Sternotomy wires and mediastinal clips are intact.",
    "Interval removal of the right internal jugular central venous catheter.",
    "Pulmonary vascularity is within normal limits.",
)


@dataclass
class Comparison:
    """Wall-clock times of a candidate and a baseline doing the same work on ``n_items`` items."""

    name: str
    modality: str
    n_items: int
    batch_size: int
    candidate: str
    baseline: str
    candidate_seconds: list[float] = field(default_factory=list)
    baseline_seconds: list[float] = field(default_factory=list)
    candidate_cpu_seconds: list[float] = field(default_factory=list)
    baseline_cpu_seconds: list[float] = field(default_factory=list)
    pre_step: str = ""  # work the candidate does that the baseline was spared (e.g. tokenising)
    pre_step_seconds: list[float] = field(default_factory=list)

    @property
    def pre_step_share(self) -> float | None:
        """Median pre-step time / median baseline time: the candidate's unavoidable extra work."""
        if not self.pre_step_seconds:
            return None
        return statistics.median(self.pre_step_seconds) / statistics.median(self.baseline_seconds)

    @property
    def candidate_items_per_s(self) -> float:
        return self.n_items / statistics.median(self.candidate_seconds)

    @property
    def baseline_items_per_s(self) -> float:
        return self.n_items / statistics.median(self.baseline_seconds)

    @property
    def ratio(self) -> float:
        """Candidate / baseline throughput from median wall time (1.0 = as fast; > 1 = faster)."""
        return self.candidate_items_per_s / self.baseline_items_per_s

    @property
    def best_ratio(self) -> float:
        """The same ratio from the fastest repeat of each (the least disturbed by other load)."""
        return min(self.baseline_seconds) / min(self.candidate_seconds)

    @property
    def cpu_ratio(self) -> float:
        """The same ratio from median process CPU time (less disturbed by other processes)."""
        return statistics.median(self.baseline_cpu_seconds) / statistics.median(
            self.candidate_cpu_seconds
        )

    def to_dict(self) -> dict[str, Any]:
        share = self.pre_step_share
        return {
            **asdict(self),
            "candidate_items_per_s": round(self.candidate_items_per_s, 2),
            "baseline_items_per_s": round(self.baseline_items_per_s, 2),
            "ratio": round(self.ratio, 3),
            "best_ratio": round(self.best_ratio, 3),
            "cpu_ratio": round(self.cpu_ratio, 3),
            "pre_step_share": None if share is None else round(share, 4),
        }


@dataclass
class BenchReport:
    """All comparisons of one run, with the machine they ran on."""

    machine: dict[str, Any]
    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "comparisons": [c.to_dict() for c in self.comparisons],
            "notes": self.notes,
        }


def compare(
    candidate: Callable[[], object],
    baseline: Callable[[], object],
    *,
    name: str,
    modality: str,
    n_items: int,
    batch_size: int,
    labels: tuple[str, str],
    repeats: int = 3,
    pre_step: tuple[str, Callable[[], object]] | None = None,
) -> Comparison:
    """Time two zero-argument callables doing the same work: one warm-up each, then interleaved repeats.

    ``pre_step`` (label, callable), if given, is timed in the same loop: the part of the
    candidate's work that the baseline skips, to tell real overhead from noise.
    """
    result = Comparison(
        name, modality, n_items, batch_size, candidate=labels[0], baseline=labels[1]
    )
    candidate()
    baseline()
    for _ in range(repeats):
        if pre_step is not None:
            result.pre_step = pre_step[0]
            result.pre_step_seconds.append(_seconds(pre_step[1])[0])
        wall, cpu = _seconds(candidate)
        result.candidate_seconds.append(wall)
        result.candidate_cpu_seconds.append(cpu)
        wall, cpu = _seconds(baseline)
        result.baseline_seconds.append(wall)
        result.baseline_cpu_seconds.append(cpu)
    return result


def _seconds(work: Callable[[], object]) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return round(time.perf_counter() - wall, 4), round(time.process_time() - cpu, 4)


def sample_texts(n: int, *, seed: int = 0) -> list[str]:
    """Report-like texts of 1-12 sentences (about 8-200 tokens), deterministic for a seed."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(_PHRASES, size=int(rng.integers(1, 13)))) for _ in range(n)]


def sample_images(n: int, *, size: int = 320, seed: int = 0) -> list[np.ndarray]:
    """Grayscale float32 images in [0, 1] (smooth noise, like a radiograph's size and dtype)."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((n, size // 16, size // 16), dtype=np.float32)
    return [np.kron(image, np.ones((16, 16), dtype=np.float32)) for image in coarse]


def bench_text(
    encoder: HFTextEncoder, texts: list[str], *, name: str, batch_size: int, repeats: int
) -> list[Comparison]:
    """embed() vs the bare model on the same pre-tokenised batches, and on input-order batches."""
    batch_plans = {
        "same pre-tokenised batches": encoder.plan_batches(texts, batch_size),
        "pre-tokenised in input order": [
            np.arange(i, min(i + batch_size, len(texts))) for i in range(0, len(texts), batch_size)
        ],
    }

    def tokenise_all() -> None:
        for index in encoder.plan_batches(texts, batch_size):
            encoder.tokenize([texts[i] for i in index])

    def bare(plan: Sequence[np.ndarray]) -> Callable[[], None]:
        batches = [encoder.tokenize([texts[i] for i in index]) for index in plan]

        def run() -> None:
            with torch.inference_mode():
                for batch in batches:
                    encoder.model(**batch)

        return run

    return [
        compare(
            _embed_call(encoder, texts, batch_size),
            bare(plan),
            name=name,
            modality="text",
            n_items=len(texts),
            batch_size=batch_size,
            labels=("Encoder.embed", f"bare model(**batch), {label}"),
            repeats=repeats,
            pre_step=("tokenise", tokenise_all),
        )
        for label, plan in batch_plans.items()
    ]


def bench_image(
    encoder: ImageEncoder,
    network: Callable[[torch.Tensor], object],
    images: list[np.ndarray],
    *,
    name: str,
    batch_size: int,
    repeats: int,
) -> Comparison:
    """embed() (with preprocessing) vs ``network`` on the same pre-processed pixel batches."""
    plan = encoder.plan_batches(images, batch_size)
    batches = [encoder.preprocess([images[i] for i in index]) for index in plan]

    def preprocess_all() -> None:
        for index in plan:
            encoder.preprocess([images[i] for i in index])

    def bare() -> None:
        with torch.inference_mode():
            for pixels in batches:
                network(pixels)

    return compare(
        _embed_call(encoder, images, batch_size),
        bare,
        name=name,
        modality="image",
        n_items=len(images),
        batch_size=batch_size,
        labels=(
            "Encoder.embed (incl. resize + normalise)",
            "bare network, same pre-processed batches",
        ),
        repeats=repeats,
        pre_step=("resize + normalise", preprocess_all),
    )


def _embed_call(encoder: Any, items: list[Any], batch_size: int) -> Callable[[], object]:
    return lambda: encoder.embed(items, batch_size=batch_size)


def run(
    *,
    n_texts: int = N_TEXTS,
    n_images: int = N_IMAGES,
    batch_size: int = BATCH_SIZE,
    repeats: int = REPEATS,
    image_size: int = IMAGE_SIZE,
) -> BenchReport:
    """Benchmark the packaged MiniLM (texts) and MobileNetV2 (images)."""
    report = BenchReport(machine=machine_info())
    text_encoder = load_encoder("minilm")
    assert isinstance(text_encoder, HFTextEncoder)
    report.comparisons += bench_text(
        text_encoder, sample_texts(n_texts), name="minilm", batch_size=batch_size, repeats=repeats
    )
    image_encoder = load_encoder("mobilenetv2", image_size=image_size)
    assert isinstance(image_encoder, MobileNetV2Encoder)
    report.comparisons.append(
        bench_image(
            image_encoder,
            image_encoder.model.features,
            sample_images(n_images),
            name=f"mobilenetv2 ({image_size} px)",
            batch_size=batch_size,
            repeats=repeats,
        )
    )
    report.machine["load_average_after"] = load_average()
    report.notes += [
        f"{repeats} interleaved repeats after one warm-up; items/s from the median wall time; "
        "ratio = candidate / baseline throughput from the median wall time, the fastest repeat, "
        "and the median process CPU time (the machine may be shared: see the load averages)",
        "texts: synthetic chest X-ray report sentences, 1-12 sentences each; embed() sorts by length",
        "images: 320x320 grayscale float32 arrays; embed() resizes them (antialiased bilinear) and normalises",
    ]
    return report


def render_markdown(report: BenchReport) -> str:
    """The report as a Markdown page."""
    lines = [
        "# Embedding throughput",
        "",
        "| encoder | items | batch | candidate | baseline | candidate items/s | baseline items/s "
        "| ratio (median wall) | ratio (best wall) | ratio (median CPU time) | pre-step / baseline |",
        "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for c in report.comparisons:
        lines.append(
            f"| {c.name} | {c.n_items} | {c.batch_size} | {c.candidate} | {c.baseline} | "
            f"{c.candidate_items_per_s:.1f} | {c.baseline_items_per_s:.1f} | {c.ratio:.3f} "
            f"| {c.best_ratio:.3f} | {c.cpu_ratio:.3f} | {_share(c)} |"
        )
    lines += ["", "## Machine", ""]
    lines += [f"- {key}: {value}" for key, value in report.machine.items()]
    lines += ["", "## Notes", ""]
    lines += [f"- {note}" for note in report.notes]
    return "\n".join(lines) + "\n"


def _share(comparison: Comparison) -> str:
    share = comparison.pre_step_share
    return "-" if share is None else f"{100 * share:.1f}% ({comparison.pre_step})"


def write_report(report: BenchReport, out_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
    """Write bench_embedding.json and bench_embedding.md atomically; returns their paths."""
    return write_results(out_dir, "bench_embedding", report.to_dict(), render_markdown(report))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--texts", type=int, default=N_TEXTS, help="number of texts")
    parser.add_argument("--images", type=int, default=N_IMAGES, help="number of images")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help="directory for the result files"
    )
    args = parser.parse_args(argv)
    report = run(
        n_texts=args.texts,
        n_images=args.images,
        batch_size=args.batch_size,
        repeats=args.repeats,
        image_size=args.image_size,
    )
    for path in write_report(report, args.out):
        print(path)
    sys.stdout.write(render_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
