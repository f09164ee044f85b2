"""The site's round: it holds a manifest's declared classes to the run's (``task-classes``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.site import Site
from client.training import require_task_classes
from common.config import RunSettings, SiteSettings
from common.errors import DataError
from common.wire import TASK_CLASSES
from tests.embedded_data import clustered


def _site(data_source: str, *, declared: bool, classes: list[str]) -> Site:
    data = clustered(16, classes=len(classes))
    data.class_names, data.classes_declared = classes, declared
    spec = SiteSettings(data=data_source).data_spec(RunSettings())
    return Site("hospital-b", spec, data, data.subset([0]), encoders={}, source="memory")


def test_a_manifest_s_declared_classes_must_be_the_runs_in_its_order(tmp_path: Path) -> None:
    manifest = str(tmp_path / "site.csv")
    run = {TASK_CLASSES: json.dumps(["normal", "nodule", "effusion"])}
    require_task_classes(
        _site(manifest, declared=True, classes=["normal", "nodule", "effusion"]), run
    )
    for other, first in (
        (["normal", "effusion", "nodule"], "class 1 is 'effusion', the run's is 'nodule'"),
        (["normal", "nodule"], "2 classes, the run's 3"),
    ):
        with pytest.raises(DataError) as caught:
            require_task_classes(_site(manifest, declared=True, classes=other), run)
        assert str(caught.value) == (
            f"site hospital-b: its .classes.json is not the run's ({first}); give every site the "
            "same sidecar as the coordinator's dataset or server-eval manifest"
        )
    # not compared: classes read from the labels, a built-in dataset, a run that sends none
    require_task_classes(_site(manifest, declared=False, classes=["effusion", "normal"]), run)
    require_task_classes(_site("digits", declared=True, classes=["a", "b"]), run)
    require_task_classes(_site(manifest, declared=True, classes=["a", "b"]), {})
