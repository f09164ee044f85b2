"""Paths a user types, made absolute against the directory they typed them in, as they are parsed.

Flower runs the ServerApp and ClientApps in other working directories (common.config resolves
relative run-/node-config paths under $FEDEMBED_HOME), and a saved head records its dataset for
later commands run elsewhere: so every path-typed option and run-config value is made absolute in
the CLI process. Each function here is an argparse ``type`` and takes the value as typed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from common.errors import ConfigError


def user_path(value: str) -> str:
    """``value`` as an absolute path (``~`` expanded; a relative one against the current directory)."""
    return os.path.abspath(os.path.expanduser(value))


def user_dataset(value: str, *, option: str = "--data") -> str:
    """A built-in dataset name as it is; a manifest path (.csv/.jsonl, or any existing file) absolute.

    A manifest path that names no file is a ConfigError naming it as typed and as resolved; any
    other value is left for the loader to refuse (it lists the built-in names).
    """
    from common.data.manifest import MANIFEST_SUFFIXES
    from common.data.registry import BUILTIN_DATASETS

    if value in BUILTIN_DATASETS or not value:
        return value
    path = Path(user_path(value))
    if path.is_file():
        return str(path)
    if path.suffix.lower() in MANIFEST_SUFFIXES:
        where = "" if str(path) == value else f" (resolved to {path})"
        raise ConfigError(f"{option} {value}: no such manifest file{where}")
    return value


def dataset_key(value: str) -> str:
    """A dataset as one name, to compare two: a built-in by name, anything else as an absolute path."""
    from common.data.registry import BUILTIN_DATASETS

    return value if value in BUILTIN_DATASETS else user_path(value)


def user_encoder(value: str) -> str:
    """A packaged encoder name or Hugging Face id as it is; a model directory that exists here, absolute."""
    path = Path(value).expanduser()
    if path.is_absolute() or not path.is_dir():
        return value
    from common.encoders import PACKAGED_ENCODERS
    from common.pipeline import _enabled

    if value.strip().lower() in PACKAGED_ENCODERS or not _enabled(value):
        return value  # names win over a directory of the same name, as load_encoder reads them
    return user_path(value)


def dataset_option(option: str) -> Callable[[str], str]:
    """``user_dataset`` as the argparse ``type`` of ``option`` (its errors name the option)."""
    return partial(user_dataset, option=option)


# Run-config keys whose values are paths (common.config.RunSettings), by how they are read.
RUN_CONFIG_DATASETS = ("dataset", "server-eval")
RUN_CONFIG_DIRS = ("run-dir",)
RUN_CONFIG_ENCODERS = ("image-encoder", "text-encoder")


def run_config_paths(values: Mapping[str, Any], *, option: str) -> dict[str, Any]:
    """``values`` (run-config overrides typed as ``option``) with every path-valued key made absolute.

    Empty strings keep their meaning (the run's default); keys may be kebab- or snake-case.
    """
    resolved = dict(values)
    for key, value in values.items():
        if not isinstance(value, str) or not value:
            continue
        name = key.replace("_", "-")
        if name in RUN_CONFIG_DATASETS:
            resolved[key] = user_dataset(value, option=f"{option} {key}")
        elif name in RUN_CONFIG_DIRS:
            resolved[key] = user_path(value)
        elif name in RUN_CONFIG_ENCODERS:
            resolved[key] = user_encoder(value)
    return resolved
