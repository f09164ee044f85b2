"""DP-SGD training throughput (Opacus per-sample gradient modes) against the same loop without DP.

Two cases. ``site-default`` is what a site trains under sample-level DP by default: the
run-config's head (``aligned``), loss (``auto``, which under DP picks a per-example objective,
``infonce-public+prompts`` for labelled image-text pairs with class prompts), batch size, learning
rate and local epochs, on synthetic embeddings of the packaged encoders' widths with class prompts.
DP-SGD trains only the affine paths of that head (client/privacy/dp_sgd.py ``trained_under_dp``),
whole here (``dp-update-space = "full"``, the most DP-SGD ever trains; the default, "prompts",
trains their coefficients along the class prompts' span, client/privacy/subspace.py), so its
non-private twin is the same loop with the same loss on the same trained parameters (the
ratio the target is about), and the whole-head loop a site without DP runs is reported beside it.
``proxy`` is the previous benchmark's row: the ``default`` head trained whole with learnable class
proxies, batch 256, against the same training without DP.

Each case and mode runs one warm-up, then private and non-private rounds interleaved, so a shared
machine's load falls on both arms alike; the load averages before and after are recorded.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
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
from client.privacy.dp_sgd import trained_under_dp
from common.config import RunSettings
from common.embedding import EmbeddedDataset
from common.heads import HEAD_PRESETS
from common.training import (
    HeadModel,
    TrainConfig,
    build_head_model,
    choose_objective,
    objective_for,
    train_head,
)
from simulations.benchmarks.results import RESULTS_DIR, markdown_appendix, write_results
from simulations.experiments.machine import load_average, machine_info

DIMS = {"image": 1280, "text": 384}  # MobileNetV2 pooled features + MiniLM sentence embeddings
N, CLASSES, REPEATS, NOISE, TARGET_OVERHEAD = 2560, 5, 3, 1.0, 2.0
UPDATE_SPACE = "full"  # the affine paths whole (see the module docstring)
BATCH_SIZE = 256  # the proxy case's batch (the previous benchmark's)
EPOCHS = {"ghost": 5, "functorch": 1, "hooks": 1}  # slow modes run fewer steps (same ratio)
SITE = RunSettings()  # the run-config defaults a site trains with


@dataclass(frozen=True)
class Case:
    """A benchmarked configuration: head preset and loss as a site builds them, batch, modes."""

    name: str
    head: str
    loss: str
    batch_size: int
    modes: tuple[str, ...]
    about: str


CASES: dict[str, Case] = {
    "site-default": Case(
        "site-default",
        head=SITE.head,
        loss=SITE.loss,
        batch_size=SITE.batch_size,
        modes=GRAD_SAMPLE_MODES,
        about="what a site trains under DP by default: the run-config's head, loss (auto), "
        "batch and learning rate, on labelled image-text pairs with class prompts",
    ),
    "proxy": Case(
        "proxy",
        head="default",
        loss="proxy",
        batch_size=BATCH_SIZE,
        modes=("ghost",),
        about="the previous benchmark's row: the default head trained whole with learnable "
        "class proxies",
    ),
}


@dataclass
class Run:
    """One training call: samples used, training-loop seconds, whole-call wall and CPU seconds."""

    samples: int
    loop_seconds: float
    call_seconds: float
    cpu_seconds: float


def _rate(runs: list[Run], seconds: Callable[[Run], float]) -> float:
    return statistics.median(r.samples / seconds(r) for r in runs)


def _loop(run: Run) -> float:
    return run.loop_seconds


@dataclass
class ModeComparison:
    """One case and per-sample gradient mode against the same loop without DP, interleaved.

    ``baseline``: the non-private loop on the parameters DP-SGD trains (the same loop without
    DP); ``whole``: the non-private loop on the whole head, what a site without DP trains (only
    when DP-SGD trains part of the head)."""

    case: str
    mode: str
    epochs: int
    objective: str = ""
    private: list[Run] = field(default_factory=list)
    baseline: list[Run] = field(default_factory=list)
    whole: list[Run] = field(default_factory=list)
    load_average: list[float] = field(default_factory=list)

    def overhead(self, seconds: Callable[[Run], float], baseline: list[Run] | None = None) -> float:
        """Non-private / private samples per second (medians): how many times slower DP is."""
        reference = self.baseline if baseline is None else baseline
        return _rate(reference, seconds) / _rate(self.private, seconds)

    @property
    def loop_overhead(self) -> float:
        return self.overhead(_loop)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "case": self.case,
            "mode": self.mode,
            "epochs": self.epochs,
            "objective": self.objective,
            "private_samples_per_s": round(_rate(self.private, _loop), 1),
            "baseline_samples_per_s": round(_rate(self.baseline, _loop), 1),
            "overhead_loop_wall": round(self.loop_overhead, 3),
            "overhead_call_wall": round(self.overhead(lambda r: r.call_seconds), 3),
            "overhead_call_cpu": round(self.overhead(lambda r: r.cpu_seconds), 3),
            "meets_target": self.loop_overhead <= TARGET_OVERHEAD,
            "load_average_after": self.load_average,
            "private_runs": [asdict(r) for r in self.private],
            "baseline_runs": [asdict(r) for r in self.baseline],
        }
        if self.whole:
            out["whole_head_samples_per_s"] = round(_rate(self.whole, _loop), 1)
            out["overhead_vs_whole_head_loop_wall"] = round(self.overhead(_loop, self.whole), 3)
            out["whole_head_runs"] = [asdict(r) for r in self.whole]
        return out


@dataclass
class BenchReport:
    """All cases and modes of one run, the modes that are not valid, and the machine."""

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
    """Random labelled image-text embeddings with the encoders' widths and one class prompt
    embedding per class (speed does not depend on the values)."""
    rng = np.random.default_rng(seed)
    return EmbeddedDataset(
        ids=[str(i) for i in range(n)],
        image=rng.normal(size=(n, DIMS["image"])).astype(np.float32),
        text=rng.normal(size=(n, DIMS["text"])).astype(np.float32),
        labels=rng.integers(0, classes, n),
        class_names=[f"class-{i}" for i in range(classes)],
        prompts=rng.normal(size=(classes, DIMS["text"])).astype(np.float32),
        classes_declared=True,  # fixed here, not read from the rows
    )


def fresh_model(*, head: str = "default", classes: int = CLASSES, loss: str = "proxy") -> HeadModel:
    return build_head_model(
        dims=DIMS, head_config=HEAD_PRESETS[head], loss=loss, num_classes=classes
    )


def round_config(case: Case, epochs: int) -> TrainConfig:
    """The round's training settings as a site gets them (``RunSettings.train_config`` after round
    1: every row trains, no validation hold-out, the head kept as it arrives), at the case's batch
    and ``epochs``."""
    config = dataclasses.replace(SITE, batch_size=case.batch_size).train_config(seed=SITE.seed)
    return dataclasses.replace(config, epochs=epochs)


def private_objective(case: Case, data: EmbeddedDataset) -> str:
    """The loss DP-SGD trains in ``case`` (what ``auto`` picks under DP, else the named loss)."""
    if case.loss != "auto":
        return case.loss
    head = fresh_model(head=case.head, classes=data.num_classes, loss=case.loss).head
    return objective_for(data, layout=head.layout, towers=head.describe()["dims"], private=True)[0]


def time_private(
    data: EmbeddedDataset,
    config: TrainConfig,
    mode: str,
    ledger_dir: Path,
    *,
    head: str,
    loss: str = "proxy",
) -> Run:
    """One DP-SGD round (fresh model and ledger) through the site's API."""
    model = fresh_model(head=head, classes=data.num_classes, loss=loss)
    ledger = ledger_dir / f"{uuid.uuid4().hex}.json"
    wall, cpu = time.perf_counter(), time.process_time()
    result = train_head_private(
        model,
        data,
        config,
        PrivacySettings(noise_multiplier=NOISE, update_space=UPDATE_SPACE, lr=config.lr),
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


def freeze_as_dp(model: HeadModel, data: EmbeddedDataset) -> list[str]:
    """Freeze the parameters DP-SGD keeps as they are on ``data`` (``trained_under_dp``); returns
    their names."""
    present = {m for m in ("image", "text") if getattr(data, m) is not None}
    frozen = [n for n, _ in model.named_parameters() if not trained_under_dp(n, model, present)]
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    return frozen


def time_baseline(
    data: EmbeddedDataset,
    config: TrainConfig,
    *,
    head: str,
    loss: str = "proxy",
    as_dp_trains: bool = False,
) -> Run:
    """The same round without privacy (common.training.train_head). ``as_dp_trains``: train only
    the parameters DP-SGD trains on ``data`` (the others frozen, as DP-SGD keeps them)."""
    model = fresh_model(head=head, classes=data.num_classes, loss=loss)
    if as_dp_trains:
        freeze_as_dp(model, data)
    wall, cpu = time.perf_counter(), time.process_time()
    result = train_head(model, data, config)
    return Run(
        samples=result.samples_seen,
        loop_seconds=round(result.seconds, 4),
        call_seconds=round(time.perf_counter() - wall, 4),
        cpu_seconds=round(time.process_time() - cpu, 4),
    )


def dp_trained_count(case: Case, data: EmbeddedDataset) -> int:
    """How many of the case's head (and proxy) weights DP-SGD trains on ``data``."""
    model = fresh_model(head=case.head, classes=data.num_classes, loss=case.loss)
    choose_objective(model, data, private=True)
    present = {m for m in ("image", "text") if getattr(data, m) is not None}
    in_objective = {id(p) for p in _objective(model, data).parameters()}
    return sum(
        p.numel()
        for n, p in model.named_parameters()
        if id(p) in in_objective and trained_under_dp(n, model, present)
    )


def dp_trains_part(case: Case, data: EmbeddedDataset) -> bool:
    """Whether DP-SGD trains only part of the case's head (then the whole-head loop differs)."""
    model = fresh_model(head=case.head, classes=data.num_classes, loss=case.loss)
    present = {m for m in ("image", "text") if getattr(data, m) is not None}
    return not all(
        trained_under_dp(n, model, present) for n, _ in model.head.named_parameters("head")
    )


def _objective(model: HeadModel, data: EmbeddedDataset) -> PrivateObjective:
    prompts = None if data.prompts is None else torch.from_numpy(data.prompts)
    return PrivateObjective(model, prompts)


def compare_mode(
    data: EmbeddedDataset, case: Case, mode: str, *, epochs: int, repeats: int, ledger_dir: Path
) -> ModeComparison:
    """One warm-up of each arm, then interleaved repeats of private and non-private training."""
    objective = private_objective(case, data)
    whole = dp_trains_part(case, data)

    def private(config: TrainConfig) -> Run:
        return time_private(data, config, mode, ledger_dir, head=case.head, loss=case.loss)

    def baseline(config: TrainConfig, *, part: bool = True) -> Run:
        return time_baseline(data, config, head=case.head, loss=objective, as_dp_trains=part)

    config, warm = round_config(case, epochs), round_config(case, 1)
    private(warm)
    baseline(warm)
    if whole:
        baseline(warm, part=False)
    result = ModeComparison(case=case.name, mode=mode, epochs=epochs, objective=objective)
    for _ in range(repeats):
        result.private.append(private(config))
        result.baseline.append(baseline(config))
        if whole:
            result.whole.append(baseline(config, part=False))
    result.load_average = load_average()
    return result


def probe_expanded_weights(data: EmbeddedDataset, case: Case) -> str:
    """Opacus' "ew" mode on the case's private objective: the error it raises (empty if it works)."""
    from opacus.grad_sample import prepare_module

    assert data.image is not None and data.text is not None and data.labels is not None
    model = fresh_model(head=case.head, classes=data.num_classes, loss=case.loss)
    choose_objective(model, data, private=True)
    present = {m for m in ("image", "text") if getattr(data, m) is not None}
    for name, p in model.named_parameters():
        p.requires_grad_(trained_under_dp(name, model, present))
    gsm = prepare_module(_objective(model, data), grad_sample_mode="ew", loss_reduction="mean")
    rows = slice(0, case.batch_size)
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
    cases: Sequence[str] = tuple(CASES),
    modes: Sequence[str] = GRAD_SAMPLE_MODES,
    repeats: int = REPEATS,
    threads: int = 1,
    examples: int = N,
    epochs: Mapping[str, int] = EPOCHS,
) -> BenchReport:
    """Benchmark each case's valid per-sample gradient modes (of ``modes``) against the same
    loop without DP, on ``examples`` rows for ``epochs[mode]`` epochs."""
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    data = synthetic_data(examples)
    from opacus import __version__ as opacus_version

    report = BenchReport(
        machine={**machine_info(), "opacus": opacus_version},
        setup={
            "cases": {
                name: {
                    **asdict(CASES[name]),
                    "head_config": HEAD_PRESETS[CASES[name].head].to_dict(),
                    "parameters": sum(
                        p.numel()
                        for p in fresh_model(
                            head=CASES[name].head, loss=CASES[name].loss
                        ).parameters()
                    ),
                    "dp_objective": private_objective(CASES[name], data),
                    "dp_trained_parameters": dp_trained_count(CASES[name], data),
                    "lr": SITE.lr,
                }
                for name in cases
            },
            "layout": "two-tower",
            "dims": DIMS,
            "classes": CLASSES,
            "examples": examples,
            "noise_multiplier": NOISE,
            "max_grad_norm": PrivacySettings().max_grad_norm,
            "repeats": repeats,
            "target_overhead": TARGET_OVERHEAD,
        },
    )
    with tempfile.TemporaryDirectory() as ledger_dir:
        for name in cases:
            case = CASES[name]
            for mode in (m for m in case.modes if m in modes):
                report.comparisons.append(
                    compare_mode(
                        data,
                        case,
                        mode,
                        epochs=epochs[mode],
                        repeats=repeats,
                        ledger_dir=Path(ledger_dir),
                    )
                )
    for name in cases:
        error = probe_expanded_weights(data, CASES[name])
        if error:
            report.invalid_modes[f"ew ({name})"] = error
    report.machine["load_average_after"] = load_average()
    report.notes += [
        f"{repeats} interleaved repeats after one warm-up of each arm; samples/s from medians; "
        "overhead = non-private / private samples per second (1.0 = no cost; lower is better); "
        "each row's load_average_after in the JSON is the machine's load when the row finished",
        "loop: the training loop only (result.seconds of train_head / train_head_private: for "
        "DP it includes the round's Opacus setup); call: the whole call, which for DP adds the "
        "ledger (budget check, RDP and PLD accounting); cpu: process CPU time of the call",
        "both arms train as a site does after round 1 (RunSettings.train_config: every row "
        "trains, no validation hold-out, the head kept as it arrives), AdamW at the run-config "
        "learning rate; DP rounds use Poisson sampling at rate B / n, sigma "
        f"{NOISE:g}, C {PrivacySettings().max_grad_norm:g}; non-private rounds shuffled batches "
        "of B",
        "site-default: DP-SGD trains the aligned head's affine paths only (its residual MLPs "
        "stay at their start); the ratio's non-private arm trains the same loss on the same "
        "parameters (the residuals frozen), and 'vs whole head' is the loop a site without DP "
        "runs with that loss (residuals trained too)",
        "slow modes (hooks, functorch) run fewer epochs; their baseline runs the same epochs, "
        "so each ratio compares equal work measured in the same run",
        "ghost: Opacus' ghost clipping (per-example gradient norms from layer activations and "
        "output gradients, then a backward pass of the clipped-weighted loss) with "
        "client/privacy/dp_sgd.py's first pass that skips the weight gradients it would "
        "discard, closed-form norms and class-proxy gradients, and no gradient copies in the "
        "optimizer; valid only for per-example losses",
        "the machine may be shared: see the load averages before and after",
    ]
    return report


def render_markdown(report: BenchReport) -> str:
    """The report as a Markdown page."""
    setup = report.setup
    lines = [
        "# DP-SGD training throughput (Opacus) vs the same loop without DP",
        "",
        f"Two-tower {setup['dims']['image']}+{setup['dims']['text']} inputs, "
        f"{setup['examples']} examples of {setup['classes']} classes with class prompts, "
        f"sigma {setup['noise_multiplier']:g}, C {setup['max_grad_norm']:g}; target overhead "
        f"<= {setup['target_overhead']:g}x (DP samples/s at least half the non-private loop's).",
        "",
    ]
    for name, case in setup["cases"].items():
        lines.append(
            f"- **{name}**: head '{case['head']}' ({case['parameters']:,} parameters, "
            f"{case['dp_trained_parameters']:,} trained under DP), loss "
            f"'{case['loss']}' (DP trains '{case['dp_objective']}'), batch "
            f"{case['batch_size']}, lr {case['lr']:g}: {case['about']}."
        )
    lines += [
        "",
        "| case | mode | epochs | DP samples/s | non-private samples/s (same parameters) "
        "| overhead (loop, wall) | overhead (call, wall) | overhead (call, CPU) "
        "| whole-head non-private samples/s | overhead vs whole head (loop) | meets target |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for c in (c.to_dict() for c in report.comparisons):
        whole = c.get("whole_head_samples_per_s")
        vs_whole = c.get("overhead_vs_whole_head_loop_wall")
        lines.append(
            f"| {c['case']} | {c['mode']} | {c['epochs']} | {c['private_samples_per_s']:.1f} "
            f"| {c['baseline_samples_per_s']:.1f} | {c['overhead_loop_wall']:.2f}x "
            f"| {c['overhead_call_wall']:.2f}x | {c['overhead_call_cpu']:.2f}x "
            f"| {'-' if whole is None else f'{whole:.1f}'} "
            f"| {'-' if vs_whole is None else f'{vs_whole:.2f}x'} "
            f"| {'yes' if c['meets_target'] else 'no'} |"
        )
    if report.invalid_modes:
        lines += ["", "## Modes that do not work for these heads", ""]
        lines += [f"- {mode}: {error}" for mode, error in report.invalid_modes.items()]
    lines += markdown_appendix(setup=None, machine=report.machine, notes=report.notes)
    return "\n".join(lines) + "\n"


def write_report(report: BenchReport, out_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
    """Write bench_dp.json and bench_dp.md atomically; returns their paths."""
    return write_results(out_dir, "bench_dp", report.to_dict(), render_markdown(report))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=tuple(CASES), default=tuple(CASES))
    parser.add_argument("--modes", nargs="+", choices=GRAD_SAMPLE_MODES, default=GRAD_SAMPLE_MODES)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (sites use 1)")
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help="directory for the result files"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    report = run(cases=args.cases, modes=args.modes, repeats=args.repeats, threads=args.threads)
    for path in write_report(report, args.out):
        print(path)
    sys.stdout.write(render_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
