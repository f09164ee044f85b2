"""The embedding benchmark: a tiny run measures every loop, the end-to-end command and its cached
re-run, reports fidelity, and writes both files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.encoders.onnx import onnxruntime_enabled
from common.encoders.runtime import bf16_native
from simulations.benchmarks import embedding


@pytest.mark.slow  # ~25 s: two packaged encoders loaded per repeat, synthetic-radiology fidelity
def test_tiny_run_times_bare_loops_end_to_end_and_cached_and_writes_reports(
    tmp_path: Path,
) -> None:
    report = embedding.run(n_images=6, n_texts=6, repeats=1, fidelity_items=4)
    torch_forms = 2 if bf16_native("cpu") else 1
    assert [e.encoder for e in report.encoders] == ["mobilenetv2", "minilm"]
    for result in report.encoders:
        forms = torch_forms + (result.modality == "image" and onnxruntime_enabled())
        assert len(result.bare) == forms * len(embedding.BATCH_SIZES)
        assert result.end_to_end is not None and result.cached is not None
        assert result.end_to_end.items == 6 and len(result.end_to_end.wall) == 1
        summary = result.summary()
        assert summary["best_bare_same_precision"].split(", ")[1].startswith(result.precision)
        assert summary["ratio_fastest"] <= summary["ratio_same_precision"]
        assert summary["cached_rerun_speedup"] > 1  # nothing is encoded the second time
        if bf16_native("cpu"):
            assert result.fidelity["bf16, benchmark inputs"]["items"] == 4
        if result.precision == "onnxruntime":  # the CNN on a CPU with ONNX Runtime: same as fp32
            assert result.fidelity["onnxruntime, benchmark inputs"]["min_cosine"] >= 0.99999
    json_path, md_path = embedding.write_report(report, tmp_path)
    document = json.loads(json_path.read_text())
    assert {e["encoder"] for e in document["encoders"]} == {"mobilenetv2", "minilm"}
    assert "fedembed embed" in md_path.read_text()


def test_inputs_are_distinct_and_reports_have_20_to_40_words(tmp_path: Path) -> None:
    manifests = embedding.write_inputs(tmp_path, n_images=5, n_texts=50)
    rows = manifests["text"].read_text().splitlines()[1:]
    texts = [row.split(",", 1)[1] for row in rows]
    assert len(set(texts)) == 50 and all(20 <= len(t.split()) <= 40 for t in texts)
    images = sorted((tmp_path / "images").glob("*.png"))
    assert len({p.read_bytes() for p in images}) == 5
