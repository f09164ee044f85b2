"""The coordinator's view of the task: built-in datasets, manifests it can read, server-eval manifests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.config import RunSettings
from common.errors import ConfigError
from common.wire import TASK_CLASSES
from server.model import describe_task, task_config


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
    # fixed by the code, but real sites replace the run-config's default dataset with their own
    # data: a built-in's list is not one their declarations must equal
    assert task["classes_declared"] and task_config(task) == {}


def test_a_manifest_the_coordinator_can_read_gives_the_task(tmp_path: Path) -> None:
    manifest = _reports(tmp_path / "reports.jsonl")
    task = describe_task(RunSettings(dataset=str(manifest)))
    assert task == {
        "modalities": ["text"],
        "class_names": ["abnormal", "normal"],
        "classes_declared": False,
        "source": str(manifest),
    }
    assert task_config(task) == {}  # read from its labels: no list to hold the sites to
    Path(f"{manifest}.classes.json").write_text('{"classes": ["normal", "abnormal"]}')
    declared = describe_task(RunSettings(dataset=str(manifest)))
    assert task_config(declared) == {TASK_CLASSES: '["normal", "abnormal"]'}


def test_sites_own_manifests_take_the_task_from_the_server_eval_manifest(tmp_path: Path) -> None:
    held = _reports(tmp_path / "coordinator-validation.jsonl")
    run = RunSettings(dataset="/data/at/each/site.jsonl", server_eval=str(held))
    assert describe_task(run)["modalities"] == ["text"]
    with pytest.raises(ConfigError, match="set server-eval"):
        describe_task(RunSettings(dataset="/data/at/each/site.jsonl"))


def test_a_server_eval_manifest_is_scored_whole_whatever_server_eval_n_and_task_say(
    tmp_path: Path, tiny_model_dirs: dict[str, Path]
) -> None:
    from server.model import ServerEvaluator

    held = _reports(tmp_path / "coordinator-validation.jsonl")
    run = RunSettings(
        dataset="/data/at/each/site.jsonl",
        server_eval=str(held),
        server_eval_n=400,  # the default: a built-in dataset's size, not a manifest's
        task="cardiomegaly",  # a built-in dataset's task: no meaning for a manifest
        loss="supcon",  # text-only reports
        image_encoder="none",
        text_encoder=str(tiny_model_dirs["text"]),
        run_dir=str(tmp_path / "run"),
    )
    evaluator = ServerEvaluator(run)
    assert len(evaluator.data) == 3


def test_the_coordinator_draws_its_validation_set_as_the_sites_draw_theirs() -> None:
    from server.model import server_eval_spec

    run = RunSettings(dataset="digits", dataset_image_size=16, server_eval="digits", seed=3)
    spec = server_eval_spec(run)
    assert (spec.image_size, spec.seed, spec.n) == (16, 3 + 7919, run.server_eval_n)
    other = RunSettings(dataset="digits", dataset_image_size=16, server_eval="iu-xray-reports")
    assert server_eval_spec(other).image_size is None  # another dataset: its own generation
