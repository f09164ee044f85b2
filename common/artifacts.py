"""Save and load a trained head: one safetensors file (weights + embedded JSON config) and a readable JSON."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.atomic import atomic_write_json
from common.config import DataSpec
from common.errors import ConfigError
from common.tensorfile import read_tensorfile, write_tensorfile
from common.training import HeadModel

WEIGHTS_FILE = "head.safetensors"
CONFIG_FILE = "head.json"
_META_KEY = "fedembed"


def state_arrays(model: HeadModel) -> dict[str, np.ndarray]:
    """The model's state as float32 numpy arrays, in state-dict order (what a site sends)."""
    return {
        k: v.detach().cpu().numpy().astype(np.float32, copy=True)
        for k, v in model.state_dict().items()
    }


def load_state_arrays(
    model: HeadModel, arrays: Mapping[str, np.ndarray], *, source: str = "weights"
) -> None:
    """Load numpy arrays into ``model``; keys and shapes must match exactly."""
    expected = model.state_dict()
    if set(arrays) != set(expected):
        missing = sorted(set(expected) - set(arrays))
        extra = sorted(set(arrays) - set(expected))
        raise ConfigError(f"{source}: head keys differ (missing {missing}, unexpected {extra})")
    state = {}
    for key, ref in expected.items():
        value = np.asarray(arrays[key])
        if tuple(value.shape) != tuple(ref.shape):
            raise ConfigError(
                f"{source}: '{key}' has shape {value.shape}, head expects {tuple(ref.shape)}"
            )
        state[key] = torch.from_numpy(np.array(value, dtype=np.float32))
    model.load_state_dict(state)


def save_head(
    directory: str | os.PathLike[str], model: HeadModel, *, metadata: Mapping[str, Any]
) -> Path:
    """Write ``head.safetensors`` (atomic; weights plus the full JSON config) and ``head.json``.

    The safetensors file alone is sufficient to rebuild the head; ``head.json`` is its readable copy.
    """
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    config = {"model": model.describe(), **dict(metadata)}
    write_tensorfile(target / WEIGHTS_FILE, state_arrays(model), key=_META_KEY, document=config)
    atomic_write_json(target / CONFIG_FILE, config)
    return target


def load_head(path: str | os.PathLike[str]) -> tuple[HeadModel, dict[str, Any]]:
    """Load a head saved by :func:`save_head` from its directory or its ``.safetensors`` file."""
    file = Path(path)
    if file.is_dir():
        file = file / WEIGHTS_FILE
    if not file.exists():
        raise ConfigError(
            f"no saved head at {file} (expected a directory written by 'fedembed train')"
        )
    try:
        arrays, config = read_tensorfile(file, key=_META_KEY)
    except ValueError as exc:
        raise ConfigError(f"{file} is not a valid fedembed head file ({exc})") from exc
    model = HeadModel.from_description(config["model"])
    load_state_arrays(model, arrays, source=str(file))
    return model, config


def recorded_data_spec(config: Mapping[str, Any], *, source: str = "head") -> DataSpec:
    """The DataSpec a saved head records under "data" (the data it was trained and split on).

    A federated run's head exported before dataset-n applied only to built-in datasets recorded
    the run's dataset-n for a manifest too; that n is dropped (its sites read the manifest whole).
    """
    if not isinstance(config.get("data"), Mapping):
        raise ConfigError(f"{source}: the head records no data spec ('data')")
    spec = DataSpec.from_dict(config["data"])
    if "run" in config and spec.n is not None:
        from common.data.registry import BUILTIN_DATASETS

        if spec.dataset not in BUILTIN_DATASETS:
            spec = replace(spec, n=None)
    return spec
