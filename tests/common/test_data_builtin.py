"""Tests for the built-in datasets (iu-xray-reports, digits) and common.data.registry."""

from __future__ import annotations

import importlib.util
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from common.data import iu_xray
from common.data.dataset import SiteDataset
from common.data.digits import load_digits_dataset
from common.data.iu_xray import IU_XRAY_TASKS, load_iu_xray, parse_iu_reports
from common.data.registry import BUILTIN_DATASETS, load_dataset, split_dataset
from common.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def reports() -> tuple[iu_xray.IUReport, ...]:
    return parse_iu_reports()


def test_iu_xray_parses_all_reports_fast() -> None:
    parse_iu_reports.cache_clear()
    start = time.perf_counter()
    parsed = parse_iu_reports()
    assert time.perf_counter() - start < 5.0
    assert len(parsed) == 3955
    assert parsed[0].id == "CXR1" and parsed[0].mesh_major == ("normal",)
    assert parsed[0].findings.startswith("The cardiac silhouette and mediastinum size")
    assert parsed[0].impression == "Normal chest x-XXXX."
    assert sum(1 for r in parsed if not r.text) == 28


def test_iu_xray_mesh_counts(reports: tuple[iu_xray.IUReport, ...]) -> None:
    heads = Counter(head for r in reports for head in r.mesh_heads)
    assert heads["normal"] == 1391
    assert heads["cardiomegaly"] == 375
    assert heads["opacity"] == 455  # reports; the archive holds 536 Opacity terms
    assert sum(1 for r in reports for t in r.mesh_major if t.startswith("opacity")) == 536


@pytest.mark.parametrize(
    ("task", "negative", "positive"),
    [("abnormal", 1363, 2463), ("cardiomegaly", 3451, 375), ("opacity", 3371, 455)],
)
def test_iu_xray_task_labels(task: str, negative: int, positive: int) -> None:
    dataset = load_iu_xray(task=task)
    assert dataset.name == "iu-xray-reports" and dataset.modalities == ("text",)
    assert len(dataset) == 3927 and len(set(dataset.ids)) == 3927
    assert dataset.labels is not None
    assert Counter(dataset.labels.tolist()) == {0: negative, 1: positive, -1: 101}
    assert dataset.class_names == list(IU_XRAY_TASKS[task].class_names)
    assert len(dataset.prompts) == 2 and all(dataset.texts or [])


def test_iu_xray_subset_and_bad_task() -> None:
    subset = load_iu_xray(n=100, seed=3)
    assert len(subset) == 100 and subset.ids == load_iu_xray(n=100, seed=3).ids
    numbers = [int(i[3:]) for i in subset.ids]
    assert numbers == sorted(numbers)
    with pytest.raises(
        ConfigError, match="unknown iu-xray-reports task 'edema'; choose from abnormal"
    ):
        load_iu_xray(task="edema")


def test_iu_xray_without_torchxrayvision(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> object:
        return None if name == "torchxrayvision" else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(DataError, match=r"pip install --no-deps torchxrayvision==1\.5\.7"):
        iu_xray.reports_archive()


def test_digits() -> None:
    dataset = load_digits_dataset()
    assert len(dataset) == 1797 and dataset.class_names == [str(d) for d in range(10)]
    assert dataset.images is not None and dataset.texts is not None and dataset.labels is not None
    image = dataset.images[0].load()
    assert image.shape == (8, 8) and image.dtype == np.float32 and float(image.max()) <= 1.0
    assert dataset.prompts[7] == "a handwritten digit seven"
    for text, label in zip(dataset.texts[:50], dataset.labels[:50], strict=True):
        words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
        assert words[label] in text or str(label) in text
    assert len(set(dataset.texts)) > 40
    upsampled = load_digits_dataset(n=10, image_size=32)
    assert len(upsampled) == 10 and upsampled.images is not None
    assert upsampled.images[0].load().shape == (32, 32)


def test_registry_builtins_and_options() -> None:
    assert set(BUILTIN_DATASETS) == {"synthetic-radiology", "iu-xray-reports", "digits"}
    synthetic = load_dataset("synthetic-radiology", n=20, site=1, image_size=32)
    assert len(synthetic) == 20 and synthetic.sites == ["site-1"] * 20
    assert synthetic.images is not None and synthetic.images[0].load().shape == (32, 32)
    assert len(load_dataset("synthetic-radiology")) == 2000
    cardio = load_dataset("iu-xray-reports", task="cardiomegaly", n=50)
    assert cardio.class_names == ["no cardiomegaly", "cardiomegaly"] and len(cardio) == 50
    # a built-in dataset's classes are fixed by its code: public, whatever rows are drawn
    assert synthetic.classes_declared and cardio.classes_declared
    assert load_dataset("digits", n=3).classes_declared
    assert len(load_dataset("digits", n=30, seed=1)) == 30
    with pytest.raises(
        ConfigError, match="iu-xray-reports: option site, image_size does not apply"
    ):
        load_dataset("iu-xray-reports", site=2, image_size=64)
    with pytest.raises(ConfigError, match="digits: option task does not apply"):
        load_dataset("digits", task="abnormal")
    with pytest.raises(ConfigError, match=r"n must be in 1\.\.1797"):
        load_dataset("digits", n=5000)


def test_registry_unknown_name_lists_builtins() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown dataset 'mimic'.*synthetic-radiology, iu-xray-reports, digits"
    ):
        load_dataset("mimic")


def test_registry_loads_manifests(tmp_path: Path) -> None:
    manifest = tmp_path / "notes.csv"
    manifest.write_text("id,text,label\na,first,x\nb,second,y\nc,,x\nd,fourth,y\n")
    with pytest.raises(DataError, match=r"notes\.csv line 4: empty text"):
        load_dataset(str(manifest))
    dataset = load_dataset(str(manifest), on_error="skip")
    assert dataset.ids == ["a", "b", "d"]
    assert len(load_dataset(str(manifest), on_error="skip", n=2)) == 2
    with pytest.raises(DataError, match="manifest not found"):
        load_dataset(str(tmp_path / "other.jsonl"))


def _labelled(n: int) -> SiteDataset:
    labels = np.array([0] * (n // 2) + [1] * (n // 4) + [2] * (n - n // 2 - n // 4))
    return SiteDataset(name="toy", ids=[f"x{i}" for i in range(n)], texts=["t"] * n, labels=labels)


def test_split_is_deterministic_disjoint_and_stratified() -> None:
    dataset = _labelled(200)
    train, test = split_dataset(dataset, test_fraction=0.25, seed=4)
    again_train, again_test = split_dataset(dataset, test_fraction=0.25, seed=4)
    assert train.ids == again_train.ids and test.ids == again_test.ids
    assert set(train.ids).isdisjoint(test.ids) and len(train) + len(test) == 200
    assert len(test) == 50 and test.ids == sorted(test.ids, key=lambda i: int(i[1:]))
    assert test.labels is not None
    assert Counter(test.labels.tolist()) == {0: 25, 1: 13, 2: 12}
    other_train, _ = split_dataset(dataset, test_fraction=0.25, seed=5)
    assert other_train.ids != train.ids
    unstratified_train, unstratified_test = split_dataset(dataset, stratify=False)
    assert len(unstratified_test) == 40 and len(unstratified_train) == 160


def test_split_edge_cases() -> None:
    with pytest.raises(ConfigError, match="test_fraction"):
        split_dataset(_labelled(10), test_fraction=1.0)
    with pytest.raises(ConfigError, match="cannot split 1"):
        split_dataset(_labelled(1))
    train, test = split_dataset(_labelled(3), test_fraction=0.1)
    assert len(train) >= 1 and len(test) >= 1
