"""Markdown tables of metric rows."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from common.metrics.inputs import (
    MetricInputError,
)


def _cell(value: object, digits: int) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float | np.floating):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def format_table(rows: list[dict[str, Any]], columns: list[str], *, digits: int = 4) -> str:
    """A GitHub-markdown table of ``rows`` restricted to ``columns`` (in that order).

    Floats get ``digits`` decimals, missing keys and None become empty cells, ``|`` in text is
    escaped. Columns whose values are all numbers are right-aligned. Cells are padded so the
    table also reads well as plain text. No trailing newline.
    """
    if not columns:
        raise MetricInputError("columns: expected at least one column name")
    cells = [[_cell(row.get(column), digits) for column in columns] for row in rows]
    numeric = [
        all(_is_number(row[column]) for row in rows if row.get(column) is not None)
        and any(row.get(column) is not None for row in rows)
        for column in columns
    ]
    header = [_cell(column, digits) for column in columns]
    widths = [
        max([3, len(header[i])] + [len(line[i]) for line in cells]) for i in range(len(columns))
    ]

    def render(values: list[str]) -> str:
        padded = [
            value.rjust(width) if right else value.ljust(width)
            for value, width, right in zip(values, widths, numeric, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = [
        ("-" * (width - 1) + ":") if right else "-" * width
        for width, right in zip(widths, numeric, strict=True)
    ]
    lines = [render(header), "| " + " | ".join(rule) + " |"]
    lines.extend(render(line) for line in cells)
    return "\n".join(lines)
