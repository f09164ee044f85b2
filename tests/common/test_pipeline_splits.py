"""How a site's rows become its training and held-out splits: a manifest's split column, test-fraction 0."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from common.config import DataSpec, RunSettings, SiteSettings
from common.errors import ConfigError, DataError
from common.pipeline import prepare_site_data

LABELS = ("normal", "cardiomegaly")


def _manifest(path: Path, rows: int, *, test_every: int = 0) -> Path:
    """A text-only manifest; with ``test_every``, every such row is marked split=test."""
    lines = ["id,text,label" + (",split" if test_every else "")]
    for i in range(rows):
        label = LABELS[i % 2]
        split = ("test" if i % test_every == 0 else "train") if test_every else None
        text = f"the heart is {'large' if label == 'cardiomegaly' else 'normal'} {i}"
        lines.append(f"r{i},{text},{label}" + (f",{split}" if split else ""))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _spec(tiny: dict[str, Path], path: Path, **kw: Any) -> DataSpec:
    return DataSpec(dataset=str(path), image_encoder="none", text_encoder=str(tiny["text"]), **kw)


def test_marked_rows_are_the_held_out_split(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    path = _manifest(tmp_path / "m.csv", 20, test_every=4)
    data = prepare_site_data(_spec(tiny_model_dirs, path), cache_dir=tmp_path / "c")
    assert data.test.ids == ["r0", "r4", "r8", "r12", "r16"]
    assert len(data.train) == 15 and not set(data.train.ids) & set(data.test.ids)


def test_exclude_leaves_marked_rows_out_and_splits_the_rest(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    path = _manifest(tmp_path / "m.csv", 20, test_every=4)
    spec = _spec(tiny_model_dirs, path, test_rows="exclude", test_fraction=0.2)
    data = prepare_site_data(spec, cache_dir=tmp_path / "c")
    seen = set(data.train.ids) | set(data.test.ids)
    assert seen == {f"r{i}" for i in range(20) if i % 4}
    assert len(data.test) == 3 and not set(data.train.ids) & set(data.test.ids)


def test_test_fraction_zero_trains_on_every_row(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    path = _manifest(tmp_path / "m.csv", 12)
    data = prepare_site_data(_spec(tiny_model_dirs, path, test_fraction=0.0), cache_dir=tmp_path)
    assert len(data.train) == 12 and len(data.test) == 0
    default = prepare_site_data(_spec(tiny_model_dirs, path), cache_dir=tmp_path)
    assert len(default.test) == 2  # stratified 20%: one per class


def test_a_split_with_nothing_to_train_on_is_an_error(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    path = _manifest(tmp_path / "m.csv", 4, test_every=1)
    for test_rows in ("holdout", "exclude"):
        spec = _spec(tiny_model_dirs, path, test_rows=test_rows)
        with pytest.raises(DataError, match=r"m\.csv: no rows left to train on \(4 rows, 4 marked"):
            prepare_site_data(spec, cache_dir=tmp_path / "c")


def test_test_rows_and_fraction_are_checked_and_reach_each_site() -> None:
    with pytest.raises(ConfigError, match="test-rows must be holdout or exclude, not 'drop'"):
        RunSettings.from_run_config({"test-rows": "drop"})
    with pytest.raises(ConfigError, match=r"test-fraction must be in \[0, 1\), got 1.0"):
        DataSpec(test_fraction=1.0)
    run = RunSettings.from_run_config({"test-rows": "exclude"})
    spec = SiteSettings(partition_id=1, num_partitions=2).data_spec(run)
    assert spec.test_rows == "exclude"
    with pytest.raises(ConfigError):
        DataSpec(test_rows="nope")
