"""The FAB `flwr run` ships to every site holds the apps' code only, and that code imports."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FLWR = Path(sys.executable).parent / "flwr"


def test_fab_holds_only_the_apps_code(tmp_path: Path) -> None:
    subprocess.run([str(FLWR), "build", "--app", str(ROOT)], cwd=tmp_path, check=True)
    (fab,) = tmp_path.glob("*.fab")
    names = [n for n in zipfile.ZipFile(fab).namelist() if not n.startswith(".info/")]
    top = {n.split("/", 1)[0] for n in names}
    assert top == {"client", "server", "common", "pyproject.toml", "LICENSE"}, sorted(top)
    assert {"client/app.py", "client/worker.py", "server/app.py", "common/heads.py"} <= set(names)
    assert all(n.endswith(".py") for n in names if "/" in n)
    # Unpacked alone (as Flower does for each ClientApp process), both apps import.
    unpacked = tmp_path / "app"
    zipfile.ZipFile(fab).extractall(unpacked)
    code = "import client.app, client.worker, client.training, server.app, server.secagg"
    subprocess.run([sys.executable, "-c", code], cwd=unpacked, check=True, env={"PYTHONPATH": "."})
