"""ONNX Runtime against torch for the packaged encoders on this CPU (issue 17).

In one process and one sitting, on the same inputs (``embedding.write_inputs``: distinct small
PNGs and 20-40-word reports), for MobileNetV2 (224 px) and MiniLM:

- torch: the bare loops of ``simulations.benchmarks.embedding`` (the packaged network on inputs
  decoded, resized / tokenised and batched beforehand; fp32 and, where the CPU has native
  bfloat16, bf16 autocast; channels-last for the CNN), at batch 32 and 64: the reference;
- ONNX Runtime (CPU execution provider): the encoder's network with its pooling (what the
  encoder's ``_forward`` computes: MobileNetV2 features -> global average pool, MiniLM hidden
  states -> masked mean) exported with ``torch.onnx.export`` (eval mode, opset 17, dynamic batch
  and sequence axes) into a temporary directory; sessions with every graph optimisation and as
  many intra-op threads as torch uses. Forms: fp32; for MiniLM dynamic int8 quantisation
  (``quantize_dynamic``, per-channel weights); for MobileNetV2 static int8 quantisation (QDQ,
  per-channel weights, calibrated on images that are not benchmark inputs);
- fidelity: per-item cosine between each form's embedding and the encoder's torch fp32
  embedding (``Encoder.embed``), on the benchmark inputs (and for the CNN on
  synthetic-radiology's images). A reduced form is usable only if every item is at cosine
  ``FIDELITY_MIN_COSINE`` or more.

Repeats are interleaved (every torch and ONNX Runtime loop once per repeat, after one warm-up of
each); rates come from medians; the 1-minute load average before each timed call is recorded.
What it decided: ONNX Runtime fp32 was 1.67x torch's fastest faithful form for MobileNetV2 with
the same embeddings, so that encoder now runs there on a CPU (``common.encoders.onnx``; its bare
loop is also in the embedding benchmark); for MiniLM no faithful ONNX Runtime form was faster, so
text stays on torch. Run: ``python -m simulations.benchmarks.onnx_runtime``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from common.encoders import Encoder, HFTextEncoder, ImageEncoder, load_encoder, pool_tokens
from common.encoders.base import default_batch_size
from common.encoders.runtime import FIDELITY_MIN_COSINE, Runtime, bf16_native
from simulations.benchmarks.embedding import (
    BATCH_SIZES,
    ENCODER_SIZE,
    Timing,
    _bare_image_loops,
    _bare_text_loops,
    _cosines,
    sample_images,
    write_inputs,
)
from simulations.benchmarks.results import (
    RESULTS_DIR,
    EncoderReport,
    markdown_appendix,
    write_results,
)
from simulations.experiments.machine import load_average, machine_info

N_IMAGES, N_TEXTS, REPEATS = 600, 1000, 3
OPSET = 17
CALIBRATION_IMAGES = 64  # static int8 calibration set (seeded images, not benchmark inputs)
RADIOLOGY_IMAGES = 300  # extra fidelity set for the image encoder

VERDICT_WIN = "faster and faithful"


@dataclass
class Form:
    """One way of running the encoder: its loop's timings and its embeddings' fidelity."""

    runtime: str  # "torch" or "onnxruntime"
    form: str
    batch: int
    timing: Timing
    fidelity: dict[str, dict[str, float]] = field(default_factory=dict)  # inputs -> cosines

    @property
    def min_cosine(self) -> float | None:
        values = [f["min_cosine"] for f in self.fidelity.values()]
        return min(values) if values else None

    @property
    def faithful(self) -> bool:
        """Every item of every input set within the product's bar (the fp32 reference is)."""
        low = self.min_cosine
        return low is not None and low >= FIDELITY_MIN_COSINE

    def to_dict(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "form": self.form,
            "batch": self.batch,
            "timing": self.timing.to_dict(),
            "fidelity": self.fidelity,
            "faithful": self.faithful,
        }


@dataclass
class EncoderComparison:
    """Every torch and ONNX Runtime form of one encoder, and what could not be measured."""

    encoder: str
    modality: str
    items: int
    forms: list[Form] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # form -> why it was not measured

    def best_torch(self) -> Form:
        """The fastest torch form that passes fidelity (fp32 always does: it is the reference)."""
        pool = [f for f in self.forms if f.runtime == "torch" and f.faithful]
        return max(pool, key=lambda f: f.timing.rate)

    def verdict(self, form: Form) -> str:
        best = self.best_torch()
        if form is best:
            return "reference (fastest faithful torch form)"
        faster = form.timing.rate > best.timing.rate
        if faster and form.faithful:
            return VERDICT_WIN
        if faster:
            return "faster, not faithful"
        return "faithful, not faster" if form.faithful else "neither faster nor faithful"

    def summary(self) -> dict[str, Any]:
        best = self.best_torch()
        ort = [f for f in self.forms if f.runtime == "onnxruntime"]
        wins = [f for f in ort if self.verdict(f) == VERDICT_WIN]
        fastest_ort = max(ort, key=lambda f: f.timing.rate) if ort else None
        top = max(wins, key=lambda f: f.timing.rate) if wins else None
        return {
            "best_faithful_torch": f"{best.form}, batch {best.batch}",
            "best_faithful_torch_items_per_s": round(best.timing.rate, 1),
            "fastest_onnxruntime": None
            if fastest_ort is None
            else f"{fastest_ort.form}, batch {fastest_ort.batch}",
            "fastest_onnxruntime_items_per_s": None
            if fastest_ort is None
            else round(fastest_ort.timing.rate, 1),
            "onnxruntime_wins": [f"{f.form}, batch {f.batch}" for f in wins],
            "best_win": None if top is None else f"{top.form}, batch {top.batch}",
            "best_win_ratio": None if top is None else round(top.timing.rate / best.timing.rate, 3),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "encoder": self.encoder,
            "modality": self.modality,
            "items": self.items,
            "forms": [
                {
                    **f.to_dict(),
                    "ratio_to_best_faithful_torch": round(
                        f.timing.rate / self.best_torch().timing.rate, 3
                    ),
                    "verdict": self.verdict(f),
                }
                for f in self.forms
            ],
            "skipped": self.skipped,
            "summary": self.summary(),
        }


# ------------------------------------------------------------------ export and sessions


class _PooledPixels(nn.Module):
    """Preprocessed pixels -> the image encoder's embedding (its ``forward_pixels``)."""

    def __init__(self, encoder: ImageEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.network = getattr(encoder, "model")  # noqa: B009  (registers the weights)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder.forward_pixels(pixels)


class _PooledTokens(nn.Module):
    """Token ids, mask (and token types) -> the text encoder's pooled embedding (its
    ``_forward``: hidden states in float32, pooled with the encoder's pooling)."""

    def __init__(self, encoder: HFTextEncoder, names: Sequence[str]) -> None:
        super().__init__()
        self.model = encoder.model
        self.pooling = encoder.pooling
        self.names = tuple(names)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        named = dict(zip(self.names, inputs, strict=True))
        hidden = self.model(**named).last_hidden_state.float()
        return pool_tokens(hidden, named["attention_mask"], self.pooling)


def _input_names(encoder: HFTextEncoder) -> list[str]:
    return list(encoder.tokenize(["probe"]).keys())


def export_image(encoder: ImageEncoder, path: Path) -> Path:
    """The encoder's network with its pooling as ONNX (fp32, dynamic batch; traced in eval mode)."""
    module = _PooledPixels(encoder).eval()
    example = encoder.preprocess(sample_images(2, size=encoder.image_size, seed=7)).contiguous()
    _export(module, (example,), path, ["pixels"], {"pixels": {0: "batch"}})
    return path


def export_text(encoder: HFTextEncoder, path: Path) -> Path:
    """The encoder's model with its token pooling as ONNX (fp32, dynamic batch and sequence).

    The example batch holds texts of different lengths, so the traced graph keeps the padding
    mask path."""
    names = _input_names(encoder)
    module = _PooledTokens(encoder, names).eval()
    example = encoder.tokenize(["probe", "The heart size is normal and the lungs are clear."])
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    _export(module, tuple(example[n] for n in names), path, names, axes)
    return path


def _export(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    names: list[str],
    axes: dict[str, dict[int, str]],
) -> None:
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and trace notes
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=names,
            output_names=["embedding"],
            dynamic_axes={**axes, "embedding": {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,  # the TorchScript exporter needs no onnxscript
        )


def session(path: Path) -> Any:
    """A CPU session with every graph optimisation and torch's intra-op thread count."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _pre_process(source: Path) -> Path:
    """ONNX Runtime's recommended step before quantising: shape inference and the basic graph
    optimisations (here: the no-op float casts of the encoder's bf16 hooks removed, batch norms
    folded into the convolutions, so the quantiser sees the graph the session runs)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    target = source.with_name(f"{source.stem}-pre.onnx")
    quant_pre_process(source, target, skip_symbolic_shape=True)
    return target


def quantise_dynamic(source: Path, target: Path) -> Path:
    """Dynamic int8 quantisation (weights int8 per channel, activations quantised at run time)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(_pre_process(source), target, per_channel=True, weight_type=QuantType.QInt8)
    return target


def quantise_static(source: Path, target: Path, calibration: Sequence[np.ndarray]) -> Path:
    """Static int8 quantisation (QDQ; weights int8 per channel, activations uint8, MinMax
    calibration on ``calibration``: pixel batches)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches: Iterator[np.ndarray] = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"pixels": batch}

    quantize_static(
        _pre_process(source),
        target,
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return target


def _ort_run(sess: Any, feeds: Sequence[dict[str, np.ndarray]]) -> np.ndarray:
    return np.concatenate([sess.run(["embedding"], feed)[0] for feed in feeds]).astype(np.float32)


# ------------------------------------------------------------------ inputs and references


def _pixel_feeds(encoder: ImageEncoder, images: Sequence[Any], size: int) -> list[dict[str, Any]]:
    """Preprocessed pixel batches (contiguous NCHW float32, in item order) as session feeds."""
    feeds = []
    for start in range(0, len(images), size):
        chunk = [
            image.load() if hasattr(image, "load") else image
            for image in images[start : start + size]
        ]
        feeds.append({"pixels": encoder.preprocess(chunk).contiguous().numpy()})
    return feeds


def _token_feeds(
    encoder: HFTextEncoder, texts: Sequence[str], size: int
) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
    """Tokenised batches in ``embed``'s order (longest first) and the item order they follow."""
    plan = encoder.plan_batches(texts, size)
    feeds = [
        {k: v.numpy() for k, v in encoder.tokenize([texts[i] for i in index]).items()}
        for index in plan
    ]
    return feeds, np.concatenate(plan)


def _embed_as(encoder: Encoder, precision: str, items: Sequence[Any], batch: int) -> np.ndarray:
    """The encoder's own ``embed`` in ``precision`` (restoring its runtime afterwards)."""
    saved = encoder.runtime
    try:
        encoder.runtime = Runtime("cpu", precision)
        return encoder.embed(items, batch_size=batch)
    finally:
        encoder.runtime = saved


# ------------------------------------------------------------------ one encoder


@dataclass
class _OrtCase:
    form: str
    path: Path
    batch: int
    feeds: list[dict[str, np.ndarray]]
    order: np.ndarray | None = None  # item index of each output row (text: longest first)


def _timed(timing: Timing, work: Callable[[], object]) -> None:
    """As the embedding benchmark's timer, to the microsecond (tiny test runs take < 1 ms)."""
    timing.load.append([round(v, 2) for v in os.getloadavg()])
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    timing.wall.append(round(time.perf_counter() - wall, 6))
    timing.cpu.append(round(time.process_time() - cpu, 6))


def _ort_loop(sess: Any, feeds: list[dict[str, np.ndarray]]) -> Callable[[], np.ndarray]:
    return lambda: _ort_run(sess, feeds)


def compare_encoder(
    name: str,
    encoder: Encoder,
    manifest: Path,
    work: Path,
    *,
    repeats: int,
    radiology_images: int = 0,
    calibration_images: int = CALIBRATION_IMAGES,
) -> EncoderComparison:
    """Time every torch and ONNX Runtime form on the manifest's items, interleaved; fidelity of
    each to the encoder's torch fp32 ``embed``."""
    from common.data.manifest import read_manifest

    dataset = read_manifest(manifest).dataset
    image = isinstance(encoder, ImageEncoder)
    items: list[Any] = list((dataset.images if image else dataset.texts) or [])
    result = EncoderComparison(name, encoder.modality, len(items))

    # torch: the embedding benchmark's bare loops, labelled "..., <precision> ..., batch <n>..."
    loops = (
        _bare_image_loops(encoder, manifest)  # type: ignore[arg-type]
        if image
        else _bare_text_loops(encoder, manifest)  # type: ignore[arg-type]
    )
    torch_loops: list[tuple[Form, Callable[[], object]]] = []
    for label, loop in loops.items():
        parts = label.split(", ")
        precision, batch = parts[1].split()[0], int(parts[2].split()[1])
        if precision == "onnxruntime":  # measured below, from this benchmark's own export
            continue
        form = Form(
            "torch",
            f"{precision}{' autocast' if precision == 'bf16' else ''}"
            f"{' channels-last' if image else ''}",
            batch,
            Timing(label, len(items), precision=precision),
        )
        torch_loops.append((form, loop))

    # fidelity references: the encoder's own embed, fp32 at fp32's default batch size
    loaded = [ref.load() for ref in items] if image else items
    fp32_batch = default_batch_size(encoder.modality, Runtime("cpu", "fp32"))
    reference = _embed_as(encoder, "fp32", loaded, fp32_batch)
    radiology: list[np.ndarray] = []
    if image and radiology_images > 0:
        from common.config import DataSpec
        from common.pipeline import load_site_dataset

        site = load_site_dataset(DataSpec(dataset="synthetic-radiology", n=radiology_images))
        radiology = [ref.load() for ref in site.images or []]
    radiology_reference = _embed_as(encoder, "fp32", radiology, fp32_batch) if radiology else None
    for form, _ in torch_loops:
        precision = form.timing.precision
        form.fidelity["benchmark inputs"] = _cosines(
            reference, _embed_as(encoder, precision, loaded, form.batch)
        )
        if radiology_reference is not None:
            form.fidelity["synthetic-radiology images"] = _cosines(
                radiology_reference, _embed_as(encoder, precision, radiology, form.batch)
            )

    # ONNX Runtime: export, quantise, sessions
    cases: list[_OrtCase] = []
    if image:
        assert isinstance(encoder, ImageEncoder)
        fp32 = export_image(encoder, work / f"{name}.onnx")
        calibration = [
            feed["pixels"]
            for feed in _pixel_feeds(
                encoder, sample_images(calibration_images, size=320, seed=1), 16
            )
        ]
        int8 = quantise_static(fp32, work / f"{name}-int8-static.onnx", calibration)
        result.skipped["int8 dynamic"] = (
            "not measured: dynamic quantisation turns convolutions into ConvInteger, which ONNX "
            "Runtime's CPU provider runs without its fast int8 kernels; static QDQ is the int8 "
            "form that gets them"
        )
        for size in BATCH_SIZES:
            feeds = _pixel_feeds(encoder, loaded, size)
            cases.append(_OrtCase("fp32", fp32, size, feeds))
            cases.append(
                _OrtCase(
                    f"int8 static QDQ per-channel (calibrated on {calibration_images} images)",
                    int8,
                    size,
                    feeds,
                )
            )
    else:
        assert isinstance(encoder, HFTextEncoder)
        fp32 = export_text(encoder, work / f"{name}.onnx")
        int8 = quantise_dynamic(fp32, work / f"{name}-int8-dynamic.onnx")
        for size in BATCH_SIZES:
            feeds, order = _token_feeds(encoder, items, size)
            cases.append(_OrtCase("fp32", fp32, size, feeds, order))
            cases.append(_OrtCase("int8 dynamic per-channel", int8, size, feeds, order))
    sessions = {path: session(path) for path in {case.path for case in cases}}
    ort_loops: list[tuple[Form, Callable[[], np.ndarray]]] = []
    for case in cases:
        sess = sessions[case.path]
        form = Form(
            "onnxruntime",
            case.form,
            case.batch,
            Timing(f"onnxruntime {case.form}, batch {case.batch}", len(items), precision=case.form),
        )
        loop = _ort_loop(sess, case.feeds)
        rows = loop()  # the warm-up run gives the fidelity embeddings
        vectors = np.empty_like(rows)
        vectors[case.order if case.order is not None else np.arange(len(rows))] = rows
        form.fidelity["benchmark inputs"] = _cosines(reference, vectors)
        if radiology_reference is not None:
            assert isinstance(encoder, ImageEncoder)
            form.fidelity["synthetic-radiology images"] = _cosines(
                radiology_reference, _ort_run(sess, _pixel_feeds(encoder, radiology, case.batch))
            )
        ort_loops.append((form, loop))

    for _, loop in torch_loops:  # warm-up (oneDNN builds its kernels once per shape)
        loop()
    everything: list[tuple[Form, Callable[[], object]]] = [*torch_loops, *ort_loops]
    for _ in range(repeats):
        for form, loop in everything:
            _timed(form.timing, loop)
    result.forms = [form for form, _ in everything]
    return result


# ------------------------------------------------------------------ the whole run


OrtReport = EncoderReport[EncoderComparison]


def _packaged(modality: str) -> tuple[str, Encoder]:
    if modality == "image":
        return "mobilenetv2", load_encoder("mobilenetv2", image_size=ENCODER_SIZE)
    return "minilm", load_encoder("minilm")


def run(
    *,
    n_images: int = N_IMAGES,
    n_texts: int = N_TEXTS,
    repeats: int = REPEATS,
    radiology_images: int = RADIOLOGY_IMAGES,
    calibration_images: int = CALIBRATION_IMAGES,
    modalities: Sequence[str] = ("image", "text"),
    encoders: Mapping[str, tuple[str, Encoder]] | None = None,
) -> OrtReport:
    """Compare torch and ONNX Runtime for each modality's encoder (the packaged ones unless
    ``encoders`` maps a modality to a (name, encoder) pair)."""
    import onnx
    import onnxruntime as ort

    machine = machine_info()
    machine.update(onnxruntime=ort.__version__, onnx=onnx.__version__)
    report = OrtReport(
        machine=machine,
        setup={
            "images": n_images,
            "texts": n_texts,
            "text_words": "20-40",
            "repeats": repeats,
            "batch_sizes": list(BATCH_SIZES),
            "bf16_native": bf16_native("cpu"),
            "torch_threads": torch.get_num_threads(),
            "onnxruntime_intra_op_threads": torch.get_num_threads(),
            "onnx_opset": OPSET,
            "static_int8_calibration_images": calibration_images,
            "radiology_fidelity_images": radiology_images,
            "fidelity_min_cosine": FIDELITY_MIN_COSINE,
        },
    )
    with tempfile.TemporaryDirectory(prefix="fedembed-bench-onnx-") as tmp:
        root = Path(tmp)
        manifests = write_inputs(root, n_images=n_images, n_texts=n_texts)
        for modality in modalities:
            name, encoder = (encoders or {}).get(modality) or _packaged(modality)
            report.encoders.append(
                compare_encoder(
                    name,
                    encoder,
                    manifests[modality],
                    root,
                    repeats=repeats,
                    radiology_images=radiology_images if modality == "image" else 0,
                    calibration_images=calibration_images,
                )
            )
    report.machine["load_average_after"] = load_average()
    report.notes += [
        f"{repeats} interleaved repeats (every loop once per repeat) after one warm-up of each "
        "loop; items/s from the median wall time; load = the 1-minute load average before each "
        "timed call (2 cores: about 2 means this benchmark alone)",
        "torch loops: simulations.benchmarks.embedding's bare loops (the text loop stops at the "
        "hidden states; the ONNX graphs also pool, a negligible extra)",
        "ONNX graphs: torch.onnx.export (TorchScript exporter, eval mode, opset "
        f"{OPSET}) of the encoder's network plus its pooling; inputs converted to numpy before "
        "timing; sessions: CPUExecutionProvider, ORT_ENABLE_ALL, intra-op threads = torch's, "
        "sequential execution",
        "fidelity: per-item cosine to the encoder's torch fp32 embed() at its default batch "
        f"size; faithful = every item >= {FIDELITY_MIN_COSINE} on every input set",
        "ratio: items/s over the fastest torch form that is faithful; verdict 'faster and "
        "faithful' = a higher rate and faithful",
    ]
    return report


def _loads(timing: Timing) -> str:
    return " / ".join(f"{load[0]:.2f}" for load in timing.load)


def render_markdown(report: OrtReport) -> str:
    lines = ["# ONNX Runtime vs torch for the packaged encoders (issue 17)", ""]
    for e in report.encoders:
        s = e.summary()
        best = e.best_torch()
        lines += [
            f"## {e.encoder} ({e.modality}, {e.items} items)",
            "",
            "| runtime | form | batch | items/s | ratio to best faithful torch | cosine min | "
            "cosine median | verdict | load before each repeat |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
        ]
        for f in e.forms:
            bench = f.fidelity.get("benchmark inputs", {})
            low = f.min_cosine
            lines.append(
                f"| {f.runtime} | {f.form} | {f.batch} | {f.timing.rate:.1f} | "
                f"{f.timing.rate / best.timing.rate:.2f}x | "
                f"{'-' if low is None else f'{low:.5f}'} | "
                f"{bench.get('median_cosine', float('nan')):.5f} | {e.verdict(f)} | "
                f"{_loads(f.timing)} |"
            )
        lines += ["", "Fidelity per input set (per-item cosine to torch fp32):", ""]
        lines += ["| runtime | form | batch | inputs | items | min | median | share below bar |"]
        lines.append("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |")
        for f in e.forms:
            for inputs, c in f.fidelity.items():
                lines.append(
                    f"| {f.runtime} | {f.form} | {f.batch} | {inputs} | {c['items']} | "
                    f"{c['min_cosine']:.5f} | {c['median_cosine']:.5f} | "
                    f"{c['share_below_bar']:.2%} |"
                )
        for skipped, why in e.skipped.items():
            lines += ["", f"- {skipped}: {why}"]
        win = s["best_win"]
        lines += [
            "",
            f"**Conclusion:** best faithful torch form: {s['best_faithful_torch']} "
            f"({s['best_faithful_torch_items_per_s']} items/s). "
            + (
                f"ONNX Runtime {win} is faster and faithful: {s['best_win_ratio']:.2f}x."
                if win
                else "No ONNX Runtime form is both faster and faithful"
                + (
                    f" (fastest: {s['fastest_onnxruntime']}, "
                    f"{s['fastest_onnxruntime_items_per_s']} items/s)."
                    if s["fastest_onnxruntime"]
                    else "."
                )
            ),
            "",
        ]
    if lines[-1] == "":
        lines.pop()  # the appendix brings its own blank line
    lines += markdown_appendix(setup=report.setup, machine=report.machine, notes=report.notes)
    return "\n".join(lines) + "\n"


def write_report(report: OrtReport, out_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
    """Write bench_onnx_runtime.json and .md atomically; returns their paths."""
    return write_results(out_dir, "bench_onnx_runtime", report.to_dict(), render_markdown(report))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=N_IMAGES)
    parser.add_argument("--texts", type=int, default=N_TEXTS)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--radiology-images", type=int, default=RADIOLOGY_IMAGES)
    parser.add_argument("--calibration-images", type=int, default=CALIBRATION_IMAGES)
    parser.add_argument("--modalities", default="image,text")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    report = run(
        n_images=args.images,
        n_texts=args.texts,
        repeats=args.repeats,
        radiology_images=args.radiology_images,
        calibration_images=args.calibration_images,
        modalities=[m for m in args.modalities.split(",") if m],
    )
    for path in write_report(report, args.out):
        print(path)
    sys.stdout.write(render_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
