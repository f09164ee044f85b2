"""The one run-config codec: ``key=value`` text <-> dict, as ``flwr run --run-config`` reads it."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from common.errors import ConfigError

ConfigValue = bool | int | float | str

_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def parse_run_config(text: str | None, *, option: str = "--run-config") -> dict[str, Any]:
    """``key=value ...`` text -> dict, parsed exactly as ``flwr run --run-config`` parses it.

    Values are TOML: numbers and booleans as they are, strings in quotes (``loss="supcon"``).
    Every fedembed command that takes run-config overrides parses them here.
    """
    from click import ClickException
    from flwr.common.config import parse_config_args

    try:
        values = dict(parse_config_args([text] if text else None))
    except (ClickException, ValueError) as exc:
        message = exc.message if isinstance(exc, ClickException) else str(exc)
        raise ConfigError(f"{option} {text!r}: {message}") from None
    if text and not values:
        raise ConfigError(f"{option} {text!r}: expected key=value pairs")
    return values


def format_config(values: Mapping[str, ConfigValue]) -> str:
    """Render ``{key: value}`` as Flower's ``--node-config`` / ``--run-config`` string.

    Strings become TOML literal strings ('...', backslashes kept) or, when they contain a single
    quote, basic strings ("..."); a string with both quote kinds cannot be passed this way.
    """
    return " ".join(f"{key}={_format_value(key, value)}" for key, value in values.items())


def _format_value(key: str, value: ConfigValue) -> str:
    if not _KEY.match(key):
        raise ConfigError(f"config key {key!r}: use letters, digits, '-', '_' or '.' only")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        has_control = any(ord(ch) < 32 for ch in value)
        if "'" not in value and not has_control:
            return f"'{value}'"
        if '"' not in value:
            return json.dumps(value, ensure_ascii=False)
        raise ConfigError(f"config key {key!r}: a string with both ' and \" cannot be passed")
    raise ConfigError(
        f"config key {key!r}: {type(value).__name__} is not a bool, int, float or str"
    )
