"""Site data as a hospital exports it: CSV/JSONL manifests of image paths, reports and labels.

The entry points live here; file parsing in ``manifest_parsing``, cell checks in ``manifest_rows``,
class declarations in ``manifest_classes``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.data.dataset import ImageRef, SiteDataset, SkippedRow
from common.data.manifest_classes import declared_classes, default_prompt
from common.data.manifest_parsing import MANIFEST_SUFFIXES, _Collector, _parse
from common.data.manifest_rows import (
    DEFAULT_COLUMNS,
    _convert_row,
    _Example,
    _header_where,
    _resolve_columns,
)
from common.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_COLUMNS",
    "MANIFEST_SUFFIXES",
    "ON_ERROR_CHOICES",
    "LoadReport",
    "SkippedRow",
    "default_prompt",
    "load_manifest",
    "read_manifest",
]

ON_ERROR_CHOICES = ("raise", "skip")


@dataclass
class LoadReport:
    """A dataset together with the rows that were skipped while building it."""

    dataset: SiteDataset
    skipped: list[SkippedRow] = field(default_factory=list)

    def summary(self, *, limit: int = 5) -> str:
        """One line: how many rows were kept and skipped, with the first reasons."""
        text = f"{self.dataset.name}: kept {len(self.dataset)} rows, skipped {len(self.skipped)}"
        if self.skipped:
            shown = "; ".join(row.describe() for row in self.skipped[:limit])
            more = f"; ... {len(self.skipped) - limit} more" if len(self.skipped) > limit else ""
            text += f" ({shown}{more})"
        return text


def load_manifest(
    path: str | os.PathLike[str],
    *,
    on_error: str = "raise",
    id_column: str | None = None,
    image_column: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    site_column: str | None = None,
    split_column: str | None = None,
    classes: Sequence[str] | None = None,
    prompts: Sequence[str] | None = None,
    name: str | None = None,
) -> SiteDataset:
    """Load a CSV/JSONL manifest as a SiteDataset (see ``read_manifest``; skips are logged)."""
    report = read_manifest(
        path,
        on_error=on_error,
        id_column=id_column,
        image_column=image_column,
        text_column=text_column,
        label_column=label_column,
        site_column=site_column,
        split_column=split_column,
        classes=classes,
        prompts=prompts,
        name=name,
    )
    if report.skipped:
        logger.warning("%s", report.summary())
    return report.dataset


def read_manifest(
    path: str | os.PathLike[str],
    *,
    on_error: str = "raise",
    id_column: str | None = None,
    image_column: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    site_column: str | None = None,
    split_column: str | None = None,
    classes: Sequence[str] | None = None,
    prompts: Sequence[str] | None = None,
    name: str | None = None,
) -> LoadReport:
    """Parse and validate a manifest; return the dataset and the rows skipped.

    Format (one example per row or JSON line; column names configurable):

    - ``id`` (optional): unique example id; defaults to the row's line number in the file.
    - ``image``: path of a PNG/JPEG/DICOM file, relative to the manifest's directory or absolute.
    - ``text``: the report or note.
    - ``label`` (optional): class name; an empty cell (or JSON null) means unlabelled (-1).
    - ``site`` (optional): the site the example came from.
    - ``split`` (optional): ``train`` or ``test`` (any case; empty means train). Rows marked
      ``test`` are held out: never trained on, scored (see ``DataSpec.test_rows``).

    At least one of ``image`` and ``text`` is required. Classes can be declared with ``classes``
    (and ``prompts``) or a sidecar JSON file ``<manifest>.classes.json`` (``site.csv.classes.json``;
    ``site.classes.json`` is also accepted) holding ``{"classes": [...], "prompts": [...]}``;
    labels outside a declared set are errors. Undeclared classes are the sorted set of labels
    found, with prompts from ``default_prompt``. Rows are named by 1-based file line numbers.

    A column argument left as None means "use the standard column name if present"; a name
    given explicitly must exist. ``on_error="raise"`` raises DataError at the first bad row;
    ``"skip"`` leaves bad rows out and lists them in the report (and in ``dataset.skipped``).
    A bad row is one with a missing, empty or non-UTF-8 field, a missing or unreadable image
    file, a duplicate id, an undeclared label, too few or too many CSV fields, or broken JSON.
    File-level problems (missing file or column, a non-UTF-8 header, broken CSV quoting, bad
    sidecar) always raise. Every message names the file, the 1-based line and the field. Image
    files must exist and are hashed (their ImageRef key) but not decoded: ``embed_dataset``
    decodes each image it has not cached yet, once, as it embeds it.
    """
    _check_on_error(on_error)
    file = Path(path)
    collector = _Collector(file=file, on_error=on_error)
    found, raw_rows = _parse(file, collector)
    if not raw_rows:
        raise DataError(f"{file}: no data rows" + _first_skip_hint(collector.skipped))
    columns = _resolve_columns(
        _header_where(file),
        found,
        {
            "id": id_column,
            "image": image_column,
            "text": text_column,
            "label": label_column,
            "site": site_column,
            "split": split_column,
        },
    )
    examples = [ex for raw in raw_rows if (ex := _convert_row(file, raw, columns, collector))]
    examples = _drop_duplicate_ids(examples, columns.get("id"), collector)
    class_names, class_prompts = declared_classes(file, classes, prompts)
    declared = class_names is not None
    if "label" in columns:
        if class_names is None:
            class_names = sorted({ex.label for ex in examples if ex.label is not None})
            class_prompts = [default_prompt(c) for c in class_names]
        examples = _drop_unknown_labels(examples, class_names, columns["label"], collector)
    if not examples:
        raise DataError(f"{file}: no usable rows" + _first_skip_hint(collector.skipped))
    dataset = _build_dataset(file, name, examples, columns, class_names or [], class_prompts or [])
    dataset.classes_declared = declared
    dataset.skipped = list(collector.skipped)
    return LoadReport(dataset=dataset, skipped=collector.skipped)


def _check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR_CHOICES:
        raise ConfigError(
            f"on_error must be one of {', '.join(ON_ERROR_CHOICES)}, got {on_error!r}"
        )


def _first_skip_hint(skipped: list[SkippedRow]) -> str:
    return f" ({len(skipped)} skipped; first: {skipped[0].describe()})" if skipped else ""


def _drop_duplicate_ids(
    examples: list[_Example], column: str | None, collector: _Collector
) -> list[_Example]:
    first_line: dict[str, int] = {}
    kept: list[_Example] = []
    for ex in examples:
        if ex.id in first_line:
            collector.problem(
                ex.line,
                f"duplicate id {ex.id!r} in field {column!r} (first at line {first_line[ex.id]})",
                ex.id,
            )
            continue
        first_line[ex.id] = ex.line
        kept.append(ex)
    return kept


def _drop_unknown_labels(
    examples: list[_Example], class_names: list[str], column: str, collector: _Collector
) -> list[_Example]:
    known = set(class_names)
    kept: list[_Example] = []
    for ex in examples:
        if ex.label is not None and ex.label not in known:
            collector.problem(
                ex.line,
                f"label {ex.label!r} in field {column!r} is not a declared class "
                f"(classes: {', '.join(class_names)})",
                ex.id,
            )
            continue
        kept.append(ex)
    return kept


def _build_dataset(
    file: Path,
    name: str | None,
    examples: list[_Example],
    columns: dict[str, str],
    class_names: list[str],
    class_prompts: list[str],
) -> SiteDataset:
    index = {class_name: i for i, class_name in enumerate(class_names)}
    images = None
    if "image" in columns:
        images = [
            ImageRef(
                key=str(ex.image_key),
                path=ex.image,
                source=_image_source(file, ex, columns["image"]),
                row=ex.line,
            )
            for ex in examples
        ]
    labels = None
    if "label" in columns:
        labels = np.array(
            [-1 if ex.label is None else index[ex.label] for ex in examples], dtype=np.int64
        )
    return SiteDataset(
        name=name or file.stem,
        ids=[ex.id for ex in examples],
        texts=[str(ex.text) for ex in examples] if "text" in columns else None,
        images=images,
        labels=labels,
        class_names=class_names,
        prompts=class_prompts,
        sites=[str(ex.site) for ex in examples] if "site" in columns else None,
        splits=[ex.split for ex in examples] if "split" in columns else None,
    )


def _image_source(file: Path, ex: _Example, column: str) -> str:
    """How an image's errors name it: manifest, line, id and field."""
    return f"{file} line {ex.line} (id {ex.id!r}) field {column!r}"
