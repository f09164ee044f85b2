"""One-file storage of named arrays plus a JSON document (safetensors), written atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save

from common.atomic import atomic_write_bytes


def write_tensorfile(
    path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray], *, key: str, document: Any
) -> None:
    """Write ``arrays`` and ``document`` (stored as JSON under metadata ``key``) atomically."""
    tensors = {name: np.array(value, order="C") for name, value in arrays.items()}
    payload = save(tensors, metadata={key: json.dumps(document, sort_keys=True, default=str)})
    atomic_write_bytes(path, payload)


def read_tensorfile(path: str | os.PathLike[str], *, key: str) -> tuple[dict[str, np.ndarray], Any]:
    """The arrays and the JSON document of a file written by :func:`write_tensorfile`.

    Raises ValueError, naming the problem, for a missing, truncated or foreign file.
    """
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            arrays = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        return arrays, json.loads(metadata[key])
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"{type(exc).__name__}: {exc}") from exc
