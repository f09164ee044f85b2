"""Class declarations of a manifest: the classes/prompts arguments or a `.classes.json` sidecar."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.errors import ConfigError, DataError


def default_prompt(class_name: str) -> str:
    """The zero-shot prompt used for a class that was declared without one."""
    return f"a report describing {class_name.replace('_', ' ').strip()}"


def declared_classes(
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
