"""The FAB `flwr run` ships to every site holds the apps' code only, and that code imports."""

from __future__ import annotations

import ast
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
    missing = sorted(app_files(ROOT) - set(names))
    assert not missing, (
        f"modules the apps import are not in the FAB (pyproject fab-include): {missing}"
    )
    # Unpacked alone (as Flower does for each ClientApp process), both apps import.
    unpacked = tmp_path / "app"
    zipfile.ZipFile(fab).extractall(unpacked)
    code = "import client.app, client.worker, client.training, server.app, server.secagg"
    subprocess.run([sys.executable, "-c", code], cwd=unpacked, check=True, env={"PYTHONPATH": "."})


APPS = ("client/app.py", "server/app.py", "client/worker.py")  # the worker runs from the FAB too
PACKAGES = ("client", "server", "common")


def app_files(root: Path) -> set[str]:
    """Every file of ours the apps import, at module level or inside functions (walked statically)."""
    seen: set[str] = set()
    todo = list(APPS)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse((root / path).read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                if name.split(".")[0] in PACKAGES:
                    todo.extend(_module_files(root, name))
    return seen


def _module_files(root: Path, name: str) -> list[str]:
    """The files importing ``name`` runs: each package's __init__.py on the way, then the module."""
    parts = name.split(".")
    files = []
    for i in range(1, len(parts) + 1):
        base = "/".join(parts[:i])
        if (root / base / "__init__.py").is_file():
            files.append(f"{base}/__init__.py")
        elif (root / f"{base}.py").is_file():
            files.append(f"{base}.py")
    return files


def test_app_files_follow_imports_into_subpackages() -> None:
    files = app_files(ROOT)
    # lazy imports inside functions count; sub-packages are followed
    assert {"client/privacy/__init__.py", "client/privacy/dp_sgd.py", "server/secagg.py"} <= files
    assert {"server/strategy/wrapper.py", "common/wire.py", "common/registries.py"} <= files
    assert not any(f.startswith(("simulations/", "tests/")) for f in files)
