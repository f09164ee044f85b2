"""The site's round: it holds declared classes to the run's (the train config's task classes)."""

from __future__ import annotations

import json

import pytest

from client.site import Site
from client.training import require_task_classes
from common.config import RunSettings, SiteSettings
from common.errors import DataError
from common.wire import TASK_CLASSES
from tests.embedded_data import clustered


def _site(*, declared: bool, classes: list[str]) -> Site:
    data = clustered(16, classes=len(classes))
    data.class_names, data.classes_declared = classes, declared
    spec = SiteSettings().data_spec(RunSettings())
    return Site("hospital-b", spec, data, data.subset([0]), encoders={}, source="memory")


def test_declared_classes_must_be_the_runs_in_its_order() -> None:
    run = {TASK_CLASSES: json.dumps(["normal", "nodule", "effusion"])}
    require_task_classes(_site(declared=True, classes=["normal", "nodule", "effusion"]), run)
    for other in (["nodule", "normal", "effusion"], ["normal", "nodule", "mass"]):
        with pytest.raises(DataError) as caught:
            require_task_classes(_site(declared=True, classes=other), run)
        message = str(caught.value)
        assert message.startswith(
            "site hospital-b: give every site the same <manifest>.classes.json; its declared "
            f"classes {other} are not the run's"
        )
    # classes read from the site's labels, or a coordinator with none declared: not compared
    require_task_classes(_site(declared=False, classes=["effusion", "normal"]), run)
    require_task_classes(_site(declared=True, classes=["a", "b"]), {})
