"""The ONNX Runtime benchmark on tiny random encoders (a random MobileNetV2 at 32 px, the tiny
BERT): every torch and ONNX Runtime form is timed, its fidelity to torch fp32 measured, and both
report files written."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from common.encoders import load_encoder
from common.encoders.mobilenet import MobileNetV2
from common.encoders.packaged import MobileNetV2Encoder
from common.encoders.runtime import FIDELITY_MIN_COSINE, bf16_native
from simulations.benchmarks import onnx_runtime
from simulations.benchmarks.embedding import BATCH_SIZES


def test_tiny_run_times_torch_and_onnx_forms_checks_fidelity_and_writes_reports(
    tmp_path: Path, tiny_model_dirs: dict[str, Path]
) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "mobilenet_v2-random.pth"
    torch.save(MobileNetV2().state_dict(), weights)
    encoders = {
        "image": ("tiny-mobilenetv2", MobileNetV2Encoder(weights, image_size=32)),
        "text": ("tiny-bert", load_encoder(str(tiny_model_dirs["text"]))),
    }
    report = onnx_runtime.run(
        n_images=5,
        n_texts=7,
        repeats=2,
        radiology_images=3,
        calibration_images=4,
        encoders=encoders,
    )
    torch_forms = (2 if bf16_native("cpu") else 1) * len(BATCH_SIZES)
    assert [e.encoder for e in report.encoders] == ["tiny-mobilenetv2", "tiny-bert"]
    for result in report.encoders:
        ort = [f for f in result.forms if f.runtime == "onnxruntime"]
        assert len(result.forms) - len(ort) == torch_forms
        assert len(ort) == 2 * len(BATCH_SIZES)  # fp32 and an int8 form at each batch size
        for form in result.forms:
            assert len(form.timing.wall) == 2 and len(form.timing.load) == 2
            assert form.timing.items == result.items and form.timing.rate > 0
            bench = form.fidelity["benchmark inputs"]
            assert bench["items"] == result.items
            assert -1.0 <= bench["min_cosine"] <= bench["median_cosine"] <= 1.0 + 1e-6
        for form in ort:
            if form.form == "fp32":  # the exported graph computes the encoder's embedding
                assert form.faithful and form.min_cosine is not None
                assert form.min_cosine >= FIDELITY_MIN_COSINE
        fp32_torch = [f for f in result.forms if f.runtime == "torch" and f.form.startswith("fp32")]
        assert all(f.faithful for f in fp32_torch)
        assert result.best_torch().faithful
    image, text = report.encoders
    assert "synthetic-radiology images" in image.forms[0].fidelity
    assert "synthetic-radiology images" not in text.forms[0].fidelity
    assert {f.form.split()[0] for f in text.forms if f.runtime == "onnxruntime"} == {"fp32", "int8"}

    json_path, md_path = onnx_runtime.write_report(report, tmp_path / "out")
    assert json_path.name == "bench_onnx_runtime.json"
    document = json.loads(json_path.read_text())
    assert {"onnxruntime", "onnx", "load_average_1_5_15_min"} <= set(document["machine"])
    for encoder in document["encoders"]:
        assert set(encoder["summary"]) >= {
            "best_faithful_torch",
            "best_faithful_torch_items_per_s",
            "onnxruntime_wins",
            "best_win_ratio",
        }
        for form in encoder["forms"]:
            assert form["verdict"] and form["ratio_to_best_faithful_torch"] > 0
            assert len(form["timing"]["load"]) == 2 and form["timing"]["items_per_s"] > 0
    markdown = md_path.read_text()
    assert "## tiny-mobilenetv2" in markdown and "## tiny-bert" in markdown
    assert "load before each repeat" in markdown and "**Conclusion:**" in markdown
