"""Talking to a SuperLink without a process per call: the staged app, the in-process Control API's errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from simulations.flower.flwr_cli import (
    Connection,
    FlowerError,
    run_logs,
    run_status,
    stage_app,
    stop_run,
)
from simulations.flower.processes import free_port

ROOT = Path(__file__).resolve().parents[3]
# Flower's FAB builder uses a pattern class pathspec deprecates (one warning per pattern and file)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pathspec")


def test_the_staged_app_packs_the_same_fab_as_the_checkout(tmp_path: Path) -> None:
    staged = stage_app(ROOT, tmp_path / "app")
    assert staged == tmp_path / "app"
    assert {p.name for p in staged.iterdir()} <= {
        "pyproject.toml",
        ".gitignore",
        "LICENSE",
        "client",
        "server",
        "common",
    }
    assert not list(staged.rglob("__pycache__"))
    # byte for byte: the same files, so the same FAB hash Flower installs the app under
    assert build_fab_from_disk(staged) == build_fab_from_disk(ROOT)


@pytest.mark.parametrize("include", [None, ["**/*.py"], ["/*.py", "/LICENSE"]])
def test_an_app_whose_patterns_do_not_name_top_level_entries_is_not_staged(
    tmp_path: Path, include: list[str] | None
) -> None:
    app = tmp_path / "app"
    app.mkdir()
    lines = ["[tool.flwr.app]", 'publisher = "x"']
    if include is not None:
        lines.append("fab-include = [" + ", ".join(f'"{p}"' for p in include) + "]")
    (app / "pyproject.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert stage_app(app, tmp_path / "staged") == app.resolve()
    assert not (tmp_path / "staged").exists()


def test_control_api_calls_to_a_superlink_that_is_not_there_raise_flower_errors(
    tmp_path: Path,
) -> None:
    nobody = Connection("gone", tmp_path, f"127.0.0.1:{free_port()}")
    with pytest.raises(FlowerError, match=r"^`flwr ls` failed: "):
        run_status(nobody, 1)
    with pytest.raises(FlowerError, match=r"^`flwr log` failed: "):
        run_logs(nobody, 1)
    stop_run(nobody, 1)  # stopping what cannot be reached is not an error
