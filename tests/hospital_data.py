"""A hospital's manifest for tests: small PNGs and reports on disk, rewritten as a site would edit it."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

FINDINGS = ("normal", "nodule", "effusion")
_SIDES = ("left", "right")
_ZONES = ("upper", "lower")


@dataclass(frozen=True)
class Row:
    """One manifest row; ``image`` is relative to the manifest's directory."""

    id: str
    image: str
    text: str
    label: str


def make_rows(root: Path, count: int, *, prefix: str = "p", start: int = 0) -> list[Row]:
    """``count`` rows with their own 16x16 PNG under ``root``/images (a finding per row, cycling)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(start, start + count):
        row_id = f"{prefix}{index}"
        label = FINDINGS[index % len(FINDINGS)]
        write_png(root / "images" / f"{row_id}.png", seed=index)
        side, zone = _SIDES[index % 2], _ZONES[(index // 2) % 2]
        finding = "normal heart and lung" if label == "normal" else f"there is a {label} in the"
        text = f"{finding} {side} {zone} lobe (patient {row_id})"  # unique: its own cache key
        rows.append(Row(row_id, f"images/{row_id}.png", text, label))
    return rows


def write_png(path: Path, *, seed: int) -> None:
    """A random 16x16 RGB PNG (a different picture for every seed)."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)


def write_manifest(path: Path, rows: list[Row], *, declared: bool = False) -> Path:
    """The manifest CSV (id, image, text, label) holding exactly ``rows``; ``declared``: with a
    ``.classes.json`` sidecar declaring FINDINGS (the consortium's class list)."""
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "image", "text", "label"])
        for row in rows:
            writer.writerow([row.id, row.image, row.text, row.label])
    if declared:
        Path(f"{path}.classes.json").write_text(json.dumps({"classes": list(FINDINGS)}))
    return path


def relabel(rows: list[Row], row_id: str, label: str) -> list[Row]:
    """``rows`` with the label of ``row_id`` corrected to ``label``."""
    return [replace(row, label=label) if row.id == row_id else row for row in rows]
