"""The coordinator's view of the task: built-in datasets, manifests it can read, server-eval manifests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.config import RunSettings
from common.errors import ConfigError
from server.model import describe_task


def _reports(path: Path) -> Path:
    rows = [
        {"text": "Clear lungs.", "label": "normal"},
        {"text": "Right basal opacity.", "label": "abnormal"},
        {"text": "No change.", "label": None},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_a_built_in_dataset_gives_its_task() -> None:
    task = describe_task(RunSettings(dataset="synthetic-radiology"))
    assert task["modalities"] == ["image", "text"] and "nodule" in " ".join(task["class_names"])


def test_a_manifest_the_coordinator_can_read_gives_the_task(tmp_path: Path) -> None:
    manifest = _reports(tmp_path / "reports.jsonl")
    task = describe_task(RunSettings(dataset=str(manifest)))
    assert task == {"modalities": ["text"], "class_names": ["abnormal", "normal"]}


def test_sites_own_manifests_take_the_task_from_the_server_eval_manifest(tmp_path: Path) -> None:
    held = _reports(tmp_path / "coordinator-validation.jsonl")
    run = RunSettings(dataset="/data/at/each/site.jsonl", server_eval=str(held))
    assert describe_task(run)["modalities"] == ["text"]
    with pytest.raises(ConfigError, match="set server-eval"):
        describe_task(RunSettings(dataset="/data/at/each/site.jsonl"))
