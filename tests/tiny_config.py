"""Run-config entries that point a test run at the tiny encoders of the ``tiny_model_dirs`` fixture."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def tiny_encoders(tiny: Mapping[str, Path]) -> dict[str, Any]:
    """The tiny image and text encoders, used at their own image size."""
    return {
        "image-encoder": str(tiny["image"]),
        "text-encoder": str(tiny["text"]),
        "encoder-image-size": 0,
    }


def tiny_run_config(tiny: Mapping[str, Path], **extra: Any) -> dict[str, Any]:
    """Tiny encoders, 120 synthetic pairs, 2 local epochs of batch 16, the small head; ``extra``
    overrides or adds keys (an overridden key keeps its place)."""
    return {
        **tiny_encoders(tiny),
        "dataset-n": 120,
        "local-epochs": 2,
        "batch-size": 16,
        "head": "small",
        **extra,
    }
