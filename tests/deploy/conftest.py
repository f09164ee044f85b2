"""The fault tests' Flower app: fedembed's ServerApp with the test ClientApp of fault_clientapp.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import tomli
import tomli_w

from tests.deploy.faults import FAULT_CLIENTAPP, REPO


@pytest.fixture(scope="session")
def fault_app(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Flower app dir: fedembed's ServerApp and run-config, ClientApp tests/deploy/fault_clientapp.py.

    It holds only pyproject.toml, LICENSE and that module: the ServerApp and the ClientApp import
    server/, client/ and common/ from the installed fedembed, and `flwr run` packs it in no time.
    """
    root = tmp_path_factory.mktemp("fault-app")
    project = tomli.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    flwr = project["tool"]["flwr"]
    flwr["app"]["components"]["clientapp"] = "fault_clientapp:app"
    flwr["app"].pop("fab-include", None)  # fedembed's patterns name its own packages
    meta = project["project"]
    pyproject = {
        "build-system": project["build-system"],
        "project": {
            "name": "fedembed-faults",
            "version": meta["version"],
            "license": meta["license"],
            "dependencies": meta["dependencies"],
        },
        "tool": {"flwr": flwr},
    }
    (root / "pyproject.toml").write_text(tomli_w.dumps(pyproject), encoding="utf-8")
    shutil.copy(REPO / "LICENSE", root / "LICENSE")
    shutil.copy(FAULT_CLIENTAPP, root / "fault_clientapp.py")
    return root
