"""Site data as a hospital exports it: CSV/JSONL manifests of image paths, reports and labels."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Container, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.data.dataset import SPLITS, ImageRef, SiteDataset, SkippedRow
from common.data.images import file_key
from common.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

ON_ERROR_CHOICES = ("raise", "skip")
__all__ = ["LoadReport", "SkippedRow", "load_manifest", "read_manifest", "verify_images"]
MANIFEST_SUFFIXES = (".csv", ".jsonl")
DEFAULT_COLUMNS = {
    "id": "id",
    "image": "image",
    "text": "text",
    "label": "label",
    "site": "site",
    "split": "split",
}


def default_prompt(class_name: str) -> str:
    """The zero-shot prompt used for a class that was declared without one."""
    return f"a report describing {class_name.replace('_', ' ').strip()}"


@dataclass
class LoadReport:
    """A dataset together with the rows that were skipped while building it."""

    dataset: SiteDataset
    skipped: list[SkippedRow] = field(default_factory=list)

    def summary(self, *, limit: int = 5) -> str:
        """One line: how many rows were kept and skipped, with the first reasons."""
        text = f"{self.dataset.name}: kept {len(self.dataset)} rows, skipped {len(self.skipped)}"
        if self.skipped:
            shown = "; ".join(_describe_skip(row) for row in self.skipped[:limit])
            more = f"; ... {len(self.skipped) - limit} more" if len(self.skipped) > limit else ""
            text += f" ({shown}{more})"
        return text


def _describe_skip(row: SkippedRow) -> str:
    return row.describe()


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
    files must exist and are hashed (their ImageRef key) but not decoded: see ``verify_images``
    (``embed_dataset`` decodes every image it has not cached yet before embedding any).
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
    class_names, class_prompts = _declared_classes(file, classes, prompts)
    if "label" in columns:
        if class_names is None:
            class_names = sorted({ex.label for ex in examples if ex.label is not None})
            class_prompts = [default_prompt(c) for c in class_names]
        examples = _drop_unknown_labels(examples, class_names, columns["label"], collector)
    if not examples:
        raise DataError(f"{file}: no usable rows" + _first_skip_hint(collector.skipped))
    dataset = _build_dataset(file, name, examples, columns, class_names or [], class_prompts or [])
    dataset.skipped = list(collector.skipped)
    return LoadReport(dataset=dataset, skipped=collector.skipped)


def verify_images(
    dataset: SiteDataset, *, on_error: str = "raise", known_good: Container[str] = ()
) -> LoadReport:
    """Decode every image file once (except keys in ``known_good``); raise at the first bad one,
    or skip. In-memory arrays cannot fail and are not touched.

    Messages name the manifest file, line, id and field, and the image path. In skip mode the
    returned dataset leaves the bad examples out and adds them to its ``skipped`` list.
    """
    _check_on_error(on_error)
    if dataset.images is None:
        return LoadReport(dataset=dataset)
    keep: list[int] = []
    skipped: list[SkippedRow] = []
    for index, image in enumerate(dataset.images):
        if image.path is not None and image.key not in known_good:
            try:
                image.load()
            except DataError as exc:
                if on_error == "raise":
                    raise
                reason = _without_location(str(exc), image.row)
                skipped.append(SkippedRow(row=image.row, id=dataset.ids[index], reason=reason))
                continue
        keep.append(index)
    if not keep:
        raise DataError(f"{dataset.name}: no readable images" + _first_skip_hint(skipped))
    if not skipped:
        return LoadReport(dataset=dataset)
    kept = dataset.subset(keep)
    kept.skipped = [*dataset.skipped, *skipped]
    return LoadReport(dataset=kept, skipped=skipped)


def _without_location(message: str, row: int | None) -> str:
    """``message`` after its "<manifest> line N " prefix (a SkippedRow names its line itself)."""
    location = f" line {row} "
    return message.split(location, 1)[1] if row is not None and location in message else message


def _check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR_CHOICES:
        raise ConfigError(
            f"on_error must be one of {', '.join(ON_ERROR_CHOICES)}, got {on_error!r}"
        )


def _first_skip_hint(skipped: list[SkippedRow]) -> str:
    return f" ({len(skipped)} skipped; first: {_describe_skip(skipped[0])})" if skipped else ""


# ----------------------------------------------------------------------------- row bookkeeping


@dataclass
class _Collector:
    """Raises or records row problems, depending on ``on_error``."""

    file: Path
    on_error: str
    skipped: list[SkippedRow] = field(default_factory=list)

    def problem(self, line: int, reason: str, row_id: str | None = None) -> None:
        if self.on_error == "raise":
            raise DataError(f"{self.file} line {line}: {reason}")
        self.skipped.append(SkippedRow(row=line, id=row_id, reason=reason))


@dataclass(frozen=True)
class _RawRow:
    line: int
    values: dict[str, Any]


@dataclass(frozen=True)
class _Example:
    line: int
    id: str
    image: Path | None
    image_key: str | None
    text: str | None
    label: str | None
    site: str | None
    split: str


# ----------------------------------------------------------------------------- parsing


def _parse(file: Path, collector: _Collector) -> tuple[list[str], list[_RawRow]]:
    suffix = file.suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise DataError(
            f"{file}: unsupported manifest format {suffix or '(no suffix)'!r}; use .csv or .jsonl"
        )
    if not file.is_file():
        raise DataError(f"manifest not found: {file}")
    text = _decode_utf8(file)
    if suffix == ".csv":
        return _parse_csv(file, text, collector)
    return _parse_jsonl(text, collector)


def _decode_utf8(file: Path) -> str:
    """The file's text; bytes that are not UTF-8 become lone surrogates, rejected per field."""
    return file.read_bytes().decode("utf-8-sig", errors="surrogateescape")


def _encoding_problem(value: str) -> str | None:
    """Why ``value`` is not valid text (a non-UTF-8 byte or a lone surrogate), else None."""
    for position, char in enumerate(value, start=1):
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:
            return (
                f"not valid UTF-8 (byte 0x{code - 0xDC00:02x} at character {position}); "
                "save the manifest as UTF-8"
            )
        if 0xD800 <= code <= 0xDFFF:
            return f"invalid Unicode (lone surrogate U+{code:04X} at character {position})"
    return None


def _parse_csv(file: Path, text: str, collector: _Collector) -> tuple[list[str], list[_RawRow]]:
    header: list[str] | None = None
    rows: list[_RawRow] = []
    for line, record in _csv_records(file, text):
        if not any(cell.strip() for cell in record):
            continue
        if header is None:
            header = _csv_header(file, line, record)
            continue
        extra = [cell for cell in record[len(header) :] if cell.strip()]
        if extra:
            collector.problem(
                line,
                f"{len(record)} fields but the header has {len(header)}: extra value "
                f"{extra[0][:30]!r} after field {header[-1]!r} (unquoted comma in a text?)",
            )
            continue
        absent = [name for name in header[len(record) :] if name]
        if absent:
            collector.problem(
                line,
                f"{len(record)} fields but the header has {len(header)}: missing field "
                f"{absent[0]!r} (row cut short?)",
            )
            continue
        values = {name: cell for name, cell in zip(header, record, strict=False) if name}
        rows.append(_RawRow(line=line, values=values))
    if header is None:
        raise DataError(f"{file}: empty manifest (no header row)")
    return [name for name in header if name], rows


def _csv_records(file: Path, text: str) -> Iterator[tuple[int, list[str]]]:
    """Yield (first line number, fields) for each CSV record."""
    reader = csv.reader(io.StringIO(text, newline=""))
    start = 1
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(f"{file} line {reader.line_num}: malformed CSV ({exc})") from exc
        yield start, record
        start = reader.line_num + 1


def _csv_header(file: Path, line: int, record: list[str]) -> list[str]:
    header = [cell.strip() for cell in record]
    seen: set[str] = set()
    for position, name in enumerate(header, start=1):
        problem = _encoding_problem(name)
        if problem:
            raise DataError(f"{file} line {line} (header): column {position} name is {problem}")
        if name and name in seen:
            raise DataError(f"{file} line {line}: duplicate column {name!r} in the header")
        seen.add(name)
    return header


def _parse_jsonl(text: str, collector: _Collector) -> tuple[list[str], list[_RawRow]]:
    found: dict[str, None] = {}
    rows: list[_RawRow] = []
    for line, content in enumerate(text.split("\n"), start=1):
        if not content.strip():
            continue
        try:
            value = json.loads(content)
        except json.JSONDecodeError as exc:
            collector.problem(line, f"malformed JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(value, dict):
            collector.problem(line, f"expected a JSON object, got {type(value).__name__}")
            continue
        bad_key = next((key for key in value if _encoding_problem(key)), None)
        if bad_key is not None:
            collector.problem(line, f"a field name is {_encoding_problem(bad_key)}")
            continue
        found.update(dict.fromkeys(value))
        rows.append(_RawRow(line=line, values=value))
    return list(found), rows


# ----------------------------------------------------------------------------- columns and rows


def _header_where(file: Path) -> str:
    """Where a column is missing: the CSV header line, or (JSONL) every row of the file."""
    return f"{file} line 1 (header)" if file.suffix.lower() == ".csv" else f"{file} (all rows)"


def _resolve_columns(
    where: str, found: list[str], requested: dict[str, str | None]
) -> dict[str, str]:
    """Map roles (id, image, text, label, site, split) to column names present in the file."""
    columns: dict[str, str] = {}
    listing = ", ".join(found) or "(none)"
    for role, explicit in requested.items():
        if explicit is not None and explicit not in found:
            raise DataError(
                f"{where}: no column {explicit!r} (the {role} column); columns found: {listing}"
            )
        column = explicit or DEFAULT_COLUMNS[role]
        if column in found:
            columns[role] = column
    if "image" not in columns and "text" not in columns:
        raise DataError(
            f"{where}: needs an image column ({DEFAULT_COLUMNS['image']!r}) or a text column "
            f"({DEFAULT_COLUMNS['text']!r}); columns found: {listing}"
        )
    return columns


def _convert_row(
    file: Path, raw: _RawRow, columns: dict[str, str], collector: _Collector
) -> _Example | None:
    """Validate one row; report a problem and return None if it cannot be used."""
    try:
        row_id = _cell_id(raw, columns)
        text = _cell_text(raw, columns)
        label = _cell_label(raw, columns)
        site = _cell_site(raw, columns)
        split = _cell_split(raw, columns)
        image, key = _cell_image(file, raw, columns, row_id)
    except _RowProblem as problem:
        collector.problem(raw.line, str(problem), _raw_id(raw, columns))
        return None
    return _Example(raw.line, row_id, image, key, text, label, site, split)


class _RowProblem(Exception):
    """A bad cell; becomes a DataError or a skipped row."""


def _raw_id(raw: _RawRow, columns: dict[str, str]) -> str | None:
    value = raw.values.get(columns.get("id", ""))
    return (
        str(value).strip() if isinstance(value, str | int) and not isinstance(value, bool) else None
    )


def _cell_string(raw: _RawRow, column: str, *, what: str) -> str | None:
    """The stripped string in ``column``; None when absent, null or empty."""
    value = raw.values.get(column)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _RowProblem(f"field {column!r} must be {what}, got JSON {type(value).__name__}")
    text = _checked(str(value), column).strip()
    return text or None


def _checked(value: str, column: str) -> str:
    problem = _encoding_problem(value)
    if problem:
        raise _RowProblem(f"field {column!r} is {problem}")
    return value


def _cell_id(raw: _RawRow, columns: dict[str, str]) -> str:
    if "id" not in columns:
        return str(raw.line)
    value = _cell_string(raw, columns["id"], what="a string or integer id")
    if value is None:
        raise _RowProblem(f"empty id in field {columns['id']!r}")
    return value


def _cell_text(raw: _RawRow, columns: dict[str, str]) -> str | None:
    if "text" not in columns:
        return None
    column = columns["text"]
    value = raw.values.get(column)
    if value is not None and not isinstance(value, str):
        raise _RowProblem(f"field {column!r} must be a string, got JSON {type(value).__name__}")
    if value is None or not value.strip():
        missing = column not in raw.values
        raise _RowProblem(
            f"missing field {column!r}" if missing else f"empty text in field {column!r}"
        )
    return _checked(value, column).strip()


def _cell_label(raw: _RawRow, columns: dict[str, str]) -> str | None:
    if "label" not in columns:
        return None
    return _cell_string(raw, columns["label"], what="a class name")


def _cell_site(raw: _RawRow, columns: dict[str, str]) -> str | None:
    if "site" not in columns:
        return None
    value = _cell_string(raw, columns["site"], what="a site name")
    if value is None:
        raise _RowProblem(f"empty site in field {columns['site']!r}")
    return value


def _cell_split(raw: _RawRow, columns: dict[str, str]) -> str:
    if "split" not in columns:
        return SPLITS[0]
    value = _cell_string(raw, columns["split"], what="train or test")
    split = (value or SPLITS[0]).lower()
    if split not in SPLITS:
        raise _RowProblem(f"split {value!r} in field {columns['split']!r} is not train or test")
    return split


def _cell_image(
    file: Path, raw: _RawRow, columns: dict[str, str], row_id: str
) -> tuple[Path | None, str | None]:
    if "image" not in columns:
        return None, None
    column = columns["image"]
    value = _cell_string(raw, column, what="an image path")
    if value is None:
        raise _RowProblem(f"empty image path in field {column!r}")
    image = Path(value).expanduser()
    if not image.is_absolute():
        image = file.parent / image
    if not image.is_file():
        reason = "is a directory, not an image file" if image.is_dir() else "image file not found"
        raise _RowProblem(f"{reason} (field {column!r}): {image}")
    try:
        return image, file_key(image)
    except DataError as exc:
        raise _RowProblem(f"{exc} (field {column!r})") from exc


def _image_source(file: Path, ex: _Example, column: str) -> str:
    """How an image's errors name it: manifest, line, id and field."""
    return f"{file} line {ex.line} (id {ex.id!r}) field {column!r}"


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


# ----------------------------------------------------------------------------- classes


def _declared_classes(
    file: Path, classes: Sequence[str] | None, prompts: Sequence[str] | None
) -> tuple[list[str] | None, list[str] | None]:
    """Classes and prompts from the arguments, else from a sidecar file, else (None, None)."""
    if classes is not None:
        names = _validate_classes(list(classes), "classes argument", ConfigError)
        return names, _validate_prompts(names, prompts, "prompts argument", ConfigError)
    if prompts is not None:
        raise ConfigError("prompts argument given without classes")
    sidecar = _find_sidecar(file)
    if sidecar is None:
        return None, None
    content = _read_sidecar(sidecar)
    names = _validate_classes(content.get("classes"), f"{sidecar}: field 'classes'", DataError)
    return names, _validate_prompts(
        names, content.get("prompts"), f"{sidecar}: field 'prompts'", DataError
    )


def _find_sidecar(file: Path) -> Path | None:
    candidates = [Path(f"{file}.classes.json"), file.with_suffix(".classes.json")]
    existing = [path for path in candidates if path.is_file()]
    if len(existing) > 1:
        raise DataError(
            f"{file}: two class declarations, {existing[0]} and {existing[1]}; keep one"
        )
    return existing[0] if existing else None


def _read_sidecar(sidecar: Path) -> dict[str, Any]:
    try:
        content = json.loads(sidecar.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{sidecar}: not a valid UTF-8 JSON file ({exc})") from exc
    if not isinstance(content, dict):
        raise DataError(f'{sidecar}: expected a JSON object {{"classes": [...], "prompts": [...]}}')
    return content


def _validate_classes(value: Any, where: str, error: type[Exception]) -> list[str]:
    if not isinstance(value, list) or not value:
        raise error(f"{where}: expected a non-empty list of class names")
    names = [item.strip() if isinstance(item, str) else item for item in value]
    if not all(isinstance(item, str) and item for item in names):
        raise error(f"{where}: class names must be non-empty strings")
    duplicates = sorted({item for item in names if names.count(item) > 1})
    if duplicates:
        raise error(f"{where}: duplicate class names {', '.join(duplicates)}")
    return names


def _validate_prompts(
    names: list[str], value: Any, where: str, error: type[Exception]
) -> list[str]:
    if value is None:
        return [default_prompt(name) for name in names]
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != len(names):
        raise error(f"{where}: expected a list of {len(names)} prompts, one per class")
    if not all(isinstance(item, str) and item.strip() for item in value):
        raise error(f"{where}: prompts must be non-empty strings")
    return [item.strip() for item in value]


# ----------------------------------------------------------------------------- assembly


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
