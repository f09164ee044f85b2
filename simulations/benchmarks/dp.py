"""DP-SGD training throughput (Opacus per-sample gradient modes) against non-private training."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.privacy import (
    GRAD_SAMPLE_MODES,
    PrivacySettings,
    PrivateObjective,
    train_head_private,
)
from common.embedding import EmbeddedDataset
from common.heads import HEAD_PRESETS
from common.training import HeadModel, TrainConfig, build_head_model, train_head
from simulations.benchmarks.results import RESULTS_DIR, write_results
from simulations.experiments.machine import load_average, machine_info

DIMS = {"image": 1280, "text": 384}  # MobileNetV2 pooled features + MiniLM sentence embeddings
N, CLASSES, BATCH_SIZE, REPEATS, NOISE, TARGET_OVERHEAD = 2560, 5, 256, 3, 1.0, 4.0
EPOCHS = {"ghost": 5, "functorch": 1, "hooks": 1}  # slow modes run fewer steps (same ratio)


@dataclass
class Run:
    """One training call: samples used, training-loop seconds, whole-call wall and CPU seconds."""

    samples: int
    loop_seconds: float
    call_seconds: float
    cpu_seconds: float


@dataclass
class ModeComparison:
    """One per-sample gradient mode against non-private training, interleaved in the same run."""

    mode: str
    epochs: int
    private: list[Run] = field(default_factory=list)
    baseline: list[Run] = field(default_factory=list)

    @staticmethod
    def _rate(runs: list[Run], seconds: Callable[[Run], float]) -> float:
        return statistics.median(r.samples / seconds(r) for r in runs)

    def overhead(self, seconds: Callable[[Run], float]) -> float:
        """Non-private / private samples per second (medians): how many times slower DP is."""
        return self._rate(self.baseline, seconds) / self._rate(self.private, seconds)

    @property
    def loop_overhead(self) -> float:
        return self.overhead(lambda r: r.loop_seconds)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "epochs": self.epochs,
            "private_samples_per_s": round(self._rate(self.private, lambda r: r.loop_seconds), 1),
            "baseline_samples_per_s": round(self._rate(self.baseline, lambda r: r.loop_seconds), 1),
            "overhead_loop_wall": round(self.loop_overhead, 3),
            "overhead_call_wall": round(self.overhead(lambda r: r.call_seconds), 3),
            "overhead_call_cpu": round(self.overhead(lambda r: r.cpu_seconds), 3),
            "meets_target": self.loop_overhead <= TARGET_OVERHEAD,
            "private_runs": [asdict(r) for r in self.private],
            "baseline_runs": [asdict(r) for r in self.baseline],
        }


@dataclass
class BenchReport:
    """All modes of one run, the modes that are not valid for this head, and the machine."""

    machine: dict[str, Any]
    setup: dict[str, Any]
    comparisons: list[ModeComparison] = field(default_factory=list)
    invalid_modes: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "setup": self.setup,
            "comparisons": [c.to_dict() for c in self.comparisons],
            "invalid_modes": self.invalid_modes,
            "notes": self.notes,
        }


def synthetic_data(n: int = N, *, classes: int = CLASSES, seed: int = 0) -> EmbeddedDataset:
    """Random labelled embeddings with the encoders' dimensions (speed does not depend on values)."""
    rng = np.random.default_rng(seed)
    return EmbeddedDataset(
        ids=[str(i) for i in range(n)],
        image=rng.normal(size=(n, DIMS["image"])).astype(np.float32),
        text=rng.normal(size=(n, DIMS["text"])).astype(np.float32),
        labels=rng.integers(0, classes, n),
        class_names=[f"class-{i}" for i in range(classes)],
    )


def fresh_model(*, head: str = "default", classes: int = CLASSES) -> HeadModel:
    return build_head_model(
        dims=DIMS, head_config=HEAD_PRESETS[head], loss="proxy", num_classes=classes
    )


def time_private(
    data: EmbeddedDataset, config: TrainConfig, mode: str, ledger_dir: Path, *, head: str
) -> Run:
    """One DP-SGD round (fresh model and ledger) through the site's API."""
    model = fresh_model(head=head, classes=data.num_classes)
    ledger = ledger_dir / f"{uuid.uuid4().hex}.json"
    wall, cpu = time.perf_counter(), time.process_time()
    result = train_head_private(
        model,
        data,
        config,
        PrivacySettings(noise_multiplier=NOISE),
        ledger_path=ledger,
        planned_rounds=1,
        run_id=1,
        server_round=1,
        grad_sample_mode=mode,
    )
    return Run(
        samples=result.samples_seen,
        loop_seconds=round(result.seconds, 4),
        call_seconds=round(time.perf_counter() - wall, 4),
        cpu_seconds=round(time.process_time() - cpu, 4),
    )


def time_baseline(data: EmbeddedDataset, config: TrainConfig, *, head: str) -> Run:
    """The same round without privacy (common.training.train_head)."""
    model = fresh_model(head=head, classes=data.num_classes)
    wall, cpu = time.perf_counter(), time.process_time()
    result = train_head(model, data, config)
    return Run(
        samples=result.samples_seen,
        loop_seconds=round(result.seconds, 4),
        call_seconds=round(time.perf_counter() - wall, 4),
        cpu_seconds=round(time.process_time() - cpu, 4),
    )


def compare_mode(
    data: EmbeddedDataset, mode: str, *, epochs: int, repeats: int, head: str, ledger_dir: Path
) -> ModeComparison:
    """One warm-up each, then interleaved repeats of private and non-private training."""
    config = TrainConfig(loss="proxy", epochs=epochs, batch_size=BATCH_SIZE)
    warm = TrainConfig(loss="proxy", epochs=1, batch_size=BATCH_SIZE)
    time_private(data, warm, mode, ledger_dir, head=head)
    time_baseline(data, warm, head=head)
    result = ModeComparison(mode=mode, epochs=epochs)
    for _ in range(repeats):
        result.private.append(time_private(data, config, mode, ledger_dir, head=head))
        result.baseline.append(time_baseline(data, config, head=head))
    return result


def probe_expanded_weights(data: EmbeddedDataset, *, head: str) -> str:
    """Opacus' "ew" mode on the head + proxy loss: the error it raises (empty if it works)."""
    from opacus.grad_sample import prepare_module

    assert data.image is not None and data.text is not None and data.labels is not None
    model = fresh_model(head=head, classes=data.num_classes)
    gsm = prepare_module(PrivateObjective(model), grad_sample_mode="ew", loss_reduction="mean")
    rows = slice(0, BATCH_SIZE)
    try:
        gsm(
            torch.from_numpy(data.image[rows]),
            torch.from_numpy(data.text[rows]),
            torch.from_numpy(data.labels[rows]),
        ).mean().backward()
    except RuntimeError as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def run(
    *,
    modes: Sequence[str] = GRAD_SAMPLE_MODES,
    repeats: int = REPEATS,
    head: str = "default",
    threads: int = 1,
) -> BenchReport:
    """Benchmark each valid per-sample gradient mode against non-private training."""
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    data = synthetic_data()
    model = fresh_model(head=head)
    from opacus import __version__ as opacus_version

    report = BenchReport(
        machine={**machine_info(), "opacus": opacus_version},
        setup={
            "head": head,
            "head_config": HEAD_PRESETS[head].to_dict(),
            "layout": "two-tower",
            "dims": DIMS,
            "parameters": sum(p.numel() for p in model.parameters()),
            "loss": "proxy",
            "classes": CLASSES,
            "examples": N,
            "batch_size": BATCH_SIZE,
            "noise_multiplier": NOISE,
            "repeats": repeats,
            "target_overhead": TARGET_OVERHEAD,
        },
    )
    with tempfile.TemporaryDirectory() as ledger_dir:
        for mode in modes:
            report.comparisons.append(
                compare_mode(
                    data,
                    mode,
                    epochs=EPOCHS[mode],
                    repeats=repeats,
                    head=head,
                    ledger_dir=Path(ledger_dir),
                )
            )
    error = probe_expanded_weights(data, head=head)
    if error:
        report.invalid_modes["ew"] = error
    report.machine["load_average_after"] = load_average()
    report.notes += [
        f"{repeats} interleaved repeats after one warm-up each; samples/s from medians; "
        "overhead = non-private / private samples per second (1.0 = no cost; lower is better)",
        "loop: the training loop only (result.seconds of train_head / train_head_private); "
        "call: the whole call, which for DP adds Opacus setup and the RDP ledger (budget check "
        "and calibration, about 0.1 s per epsilon evaluation); cpu: process CPU time of the call",
        "DP rounds use Poisson sampling (expected batch 256), sigma 1.0, C 1.0, AdamW; "
        "non-private rounds use shuffled batches of 256; both on the same synthetic data",
        "slow modes (hooks, functorch) run fewer epochs; their baseline runs the same epochs, "
        "so each ratio compares equal work measured in the same run",
        "ghost clipping (two backward passes, per-sample norms without per-sample gradients; the "
        "proxies' per-sample gradients come from functorch) needs a per-example loss: valid only "
        "because the proxy loss is decomposable",
        "the machine may be shared: see the load averages before and after",
    ]
    return report


def render_markdown(report: BenchReport) -> str:
    """The report as a Markdown page."""
    setup = report.setup
    lines = [
        "# DP-SGD training throughput (Opacus) vs non-private",
        "",
        f"Head '{setup['head']}' ({setup['parameters']:,} parameters incl. proxies), two-tower "
        f"{setup['dims']['image']}+{setup['dims']['text']} inputs, proxy loss, batch "
        f"{setup['batch_size']}, {setup['examples']} examples; target overhead <= "
        f"{setup['target_overhead']:g}x.",
        "",
        "| mode | epochs | DP samples/s | non-private samples/s | overhead (loop, wall) "
        "| overhead (call, wall) | overhead (call, CPU) | meets target |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for c in (c.to_dict() for c in report.comparisons):
        lines.append(
            f"| {c['mode']} | {c['epochs']} | {c['private_samples_per_s']:.1f} "
            f"| {c['baseline_samples_per_s']:.1f} | {c['overhead_loop_wall']:.2f}x "
            f"| {c['overhead_call_wall']:.2f}x | {c['overhead_call_cpu']:.2f}x "
            f"| {'yes' if c['meets_target'] else 'no'} |"
        )
    if report.invalid_modes:
        lines += ["", "## Modes that do not work for this head", ""]
        lines += [f"- {mode}: {error}" for mode, error in report.invalid_modes.items()]
    lines += ["", "## Machine", ""]
    lines += [f"- {key}: {value}" for key, value in report.machine.items()]
    lines += ["", "## Notes", ""]
    lines += [f"- {note}" for note in report.notes]
    return "\n".join(lines) + "\n"


def write_report(report: BenchReport, out_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
    """Write bench_dp.json and bench_dp.md atomically; returns their paths."""
    return write_results(out_dir, "bench_dp", report.to_dict(), render_markdown(report))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--modes", nargs="+", choices=GRAD_SAMPLE_MODES, default=GRAD_SAMPLE_MODES)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--head", choices=sorted(HEAD_PRESETS), default="default")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (sites use 1)")
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help="directory for the result files"
    )
    args = parser.parse_args(argv)
    report = run(modes=args.modes, repeats=args.repeats, head=args.head, threads=args.threads)
    for path in write_report(report, args.out):
        print(path)
    sys.stdout.write(render_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
