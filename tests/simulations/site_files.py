"""Small hospital manifests for CLI tests: PNGs and reports on disk, an optional split column."""

from __future__ import annotations

import csv
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.config import HOME_ENV

FINDINGS = ("normal", "nodule", "effusion")
_REPORTS = {
    "normal": "normal heart and lung",
    "nodule": "there is a small nodule in the {side} {zone} lobe",
    "effusion": "large pleural effusion {side}",
    "cardiomegaly": "cardiomegaly with a large heart",
}


def write_site(
    path: Path,
    count: int,
    *,
    findings: Sequence[str] = FINDINGS,
    start: int = 0,
    images: bool = True,
    split: Callable[[int], str] | None = None,
) -> Path:
    """A CSV manifest of ``count`` rows (id, image, text, label[, split]) with its PNGs beside it.

    Row k has finding ``findings[k % len(findings)]`` and a report naming it; ``split(k)`` fills
    a split column. Images are 16x16 PNGs in ``path.parent``/images (``images=False``: text only).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / "images").mkdir(exist_ok=True)
    header = ["id", *(["image"] if images else []), "text", "label"]
    header += ["split"] if split else []
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for k in range(start, start + count):
            label = findings[k % len(findings)]
            row_id = f"{path.stem}-{k}"
            text = _REPORTS[label].format(
                side=("left", "right")[k % 2], zone=("upper", "lower")[k % 3 % 2]
            )
            cells = [row_id]
            if images:
                rng = np.random.default_rng(k)
                image = path.parent / "images" / f"{row_id}.png"
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(image)
                cells.append(f"images/{row_id}.png")
            cells += [text, label]
            cells += [split(k)] if split else []
            writer.writerow(cells)
    return path


def enter_workdir(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Makes ``root`` the working directory, with its own fedembed home ``root``/home."""
    monkeypatch.chdir(root)
    monkeypatch.setenv(HOME_ENV, str(root / "home"))
    return root


def link_encoders(root: Path, tiny_model_dirs: dict[str, Path]) -> dict[str, str]:
    """Copies of the tiny encoders under ``root``/models: their paths relative to ``root``."""
    relative = {}
    for modality, source in tiny_model_dirs.items():
        target = root / "models" / source.name
        if not target.exists():
            shutil.copytree(source, target)
        relative[modality] = str(target.relative_to(root))
    return relative
