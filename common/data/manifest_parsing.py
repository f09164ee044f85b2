"""Reading a manifest file into raw rows (CSV or JSONL, strict UTF-8), recording bad rows."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.data.dataset import SkippedRow
from common.errors import DataError

MANIFEST_SUFFIXES = (".csv", ".jsonl")


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
    if value.isascii():  # the common case, checked in C (as is the next one)
        return None
    try:
        value.encode("utf-8")  # strict: any surrogate, escaped byte or lone, fails here
        return None
    except UnicodeEncodeError:
        pass
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
