"""A site whose data is all cached knows its encoders from the cache's load records: no model load."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import common.pipeline as pipeline
from common.config import DataSpec, RunSettings
from common.errors import CacheError
from common.pipeline import RecordedEncoder, embed_site, known_encoder
from tests.tiny_config import tiny_encoders


def _spec(tiny: dict[str, Path], n: int = 24) -> DataSpec:
    return DataSpec(
        dataset="synthetic-radiology",
        n=n,
        seed=3,
        image_encoder=str(tiny["image"]),
        text_encoder=str(tiny["text"]),
    )


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every model load this test makes (the per-process encoder memo starts empty)."""
    made: list[str] = []
    real = pipeline.load_encoder

    def counting(spec: str, **kw: Any) -> Any:
        made.append(spec)
        return real(spec, **kw)

    pipeline._cached_encoder.cache_clear()
    monkeypatch.setattr(pipeline, "load_encoder", counting)
    yield made
    pipeline._cached_encoder.cache_clear()


def test_a_fully_cached_site_embeds_without_loading_a_model(
    tiny_model_dirs: dict[str, Path], tmp_path: Path, loads: list[str]
) -> None:
    first, _, identities = embed_site(_spec(tiny_model_dirs), cache_dir=tmp_path)
    assert len(loads) == 2  # image and text, loaded once and recorded
    pipeline._cached_encoder.cache_clear()  # as a new process
    again, report, known = embed_site(_spec(tiny_model_dirs), cache_dir=tmp_path)
    assert len(loads) == 2 and report.encoded == 0
    assert known == identities
    assert np.array_equal(first.image, again.image) and np.array_equal(first.text, again.text)
    # New rows need the model: it is loaded then, and gives the recorded identity.
    _, report, _ = embed_site(_spec(tiny_model_dirs, n=36), cache_dir=tmp_path)
    assert report.encoded > 0 and len(loads) == 4


def test_a_record_counts_only_for_the_same_files_and_settings(
    tiny_model_dirs: dict[str, Path], tmp_path: Path, loads: list[str]
) -> None:
    model = tmp_path / "text-model"
    shutil.copytree(tiny_model_dirs["text"], model)
    first = known_encoder(str(model), modality="text", max_length=32, cache_dir=tmp_path / "c")
    assert not isinstance(first, RecordedEncoder) and loads == [str(model)]
    pipeline._cached_encoder.cache_clear()
    same = known_encoder(str(model), modality="text", max_length=32, cache_dir=tmp_path / "c")
    assert isinstance(same, RecordedEncoder) and same.identity() == first.identity()
    assert same.dim == first.dim and len(loads) == 1
    # Another max length, or changed model files: a different load, not the record.
    known_encoder(str(model), modality="text", max_length=16, cache_dir=tmp_path / "c")
    assert len(loads) == 2
    config = model / "config.json"
    config.write_text(config.read_text(encoding="utf-8") + "\n", encoding="utf-8")
    changed = known_encoder(str(model), modality="text", max_length=32, cache_dir=tmp_path / "c")
    assert not isinstance(changed, RecordedEncoder) and len(loads) == 3
    assert changed.identity()["weights"] != first.identity()["weights"]


def test_a_record_the_model_contradicts_is_refused_when_embedding(
    tiny_model_dirs: dict[str, Path], tmp_path: Path, loads: list[str]
) -> None:
    text = str(tiny_model_dirs["text"])
    known_encoder(text, modality="text", cache_dir=tmp_path)
    pipeline._cached_encoder.cache_clear()
    recorded = known_encoder(text, modality="text", cache_dir=tmp_path)
    assert isinstance(recorded, RecordedEncoder)
    recorded._identity["dim"] = 7  # as if the record described another model
    with pytest.raises(CacheError, match="identity differs"):
        recorded.embed(["a report"])


def test_the_coordinator_sizes_the_head_from_its_records(
    tiny_model_dirs: dict[str, Path],
    tmp_path: Path,
    loads: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from server.model import initial_model

    monkeypatch.setenv("FEDEMBED_HOME", str(tmp_path))
    run = RunSettings.from_run_config({**tiny_encoders(tiny_model_dirs), "head": "small"})
    model, _ = initial_model(run)
    assert len(loads) == 2
    pipeline._cached_encoder.cache_clear()
    again, _ = initial_model(run)
    assert len(loads) == 2  # the second run reads both sizes from $FEDEMBED_HOME/cache
    assert [p.shape for p in again.parameters()] == [p.shape for p in model.parameters()]
