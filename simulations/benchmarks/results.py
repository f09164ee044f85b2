"""The one results writer: a JSON document and its markdown report, side by side, written atomically."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

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


def markdown_appendix(
    *, setup: Mapping[str, Any] | None, machine: Mapping[str, Any], notes: Sequence[str]
) -> list[str]:
    """The Setup (when given), Machine and Notes sections a benchmark's markdown ends with."""
    lines: list[str] = []
    if setup is not None:
        lines += ["", "## Setup", ""]
        lines += [f"- {key}: {value}" for key, value in setup.items()]
    lines += ["", "## Machine", ""]
    lines += [f"- {key}: {value}" for key, value in machine.items()]
    lines += ["", "## Notes", ""]
    lines += [f"- {note}" for note in notes]
    return lines


class _Reportable(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


E = TypeVar("E", bound=_Reportable)


@dataclass
class EncoderReport(Generic[E]):
    """One run of a per-encoder benchmark: the machine, the setup, one result per encoder, notes."""

    machine: dict[str, Any]
    setup: dict[str, Any]
    encoders: list[E] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "setup": self.setup,
            "encoders": [e.to_dict() for e in self.encoders],
            "notes": self.notes,
        }
