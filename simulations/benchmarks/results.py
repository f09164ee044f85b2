"""The one results writer: a JSON document and its markdown report, side by side, written atomically."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.atomic import atomic_write_json, atomic_write_text

RESULTS_DIR = Path(__file__).resolve().parents[2] / "docs" / "results"
"""Where the committed benchmark and experiment results live (repo-root docs/results)."""


def write_results(
    out_dir: str | Path, name: str, document: Mapping[str, Any], markdown: str
) -> tuple[Path, Path]:
    """Write ``name``.json (indented, sorted keys) and ``name``.md in ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    atomic_write_json(json_path, document)
    atomic_write_text(md_path, markdown)
    return json_path, md_path
