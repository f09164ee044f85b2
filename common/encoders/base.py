"""The Encoder interface every frozen encoder implements, and the checks all of them share."""

from __future__ import annotations

import copy
import inspect
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from common.encoders.fingerprint import fingerprint_files
from common.errors import ConfigError

# Bump whenever a change in this package can change embedding values.
ENCODER_CODE_VERSION = 1

MODALITIES = ("text", "image")


class Encoder(ABC):
    """A frozen model mapping items of one modality to float32 vectors of size ``dim``.

    ``embed`` runs in batches under ``torch.inference_mode()`` with the model in eval mode and
    gradients off; the same items in the same order give bitwise-identical output run to run.
    The encoder never changes torch's global thread settings: it uses whatever the process set.
    """

    modality: str
    dim: int

    def __init__(self, *, source: str, weight_files: Sequence[Path], batch_size: int) -> None:
        self.source = source
        self.weight_files = tuple(weight_files)
        self.batch_size = _check_batch_size(batch_size)
        self._identity: dict[str, Any] | None = None

    def identity(self) -> dict[str, Any]:
        """JSON-able description that changes whenever ``embed`` could return different values.

        Holds the code version, the source, a fingerprint of the weight files (see
        ``fingerprint_files``), the output size and dtype, and the pooling and preprocessing.
        """
        if self._identity is None:
            self._identity = {
                "code_version": ENCODER_CODE_VERSION,
                "encoder": type(self).__name__,
                "modality": self.modality,
                "source": self.source,
                "weights": fingerprint_files(self.weight_files),
                "dim": self.dim,
                "dtype": "float32",
                **self._settings(),
            }
        return copy.deepcopy(self._identity)

    def embed(
        self, items: Sequence[Any], *, batch_size: int | None = None, progress: bool = False
    ) -> np.ndarray:
        """Embed ``items`` (texts, or float32 image arrays (H, W) / (H, W, 3) in [0, 1]).

        Returns a float32 array [len(items), dim], row i for item i.
        """
        items = list(items)
        self._validate(items)
        size = self.batch_size if batch_size is None else _check_batch_size(batch_size)
        out = np.empty((len(items), self.dim), dtype=np.float32)
        bar = tqdm(
            total=len(items),
            desc=f"{self.modality} embeddings",
            unit=self.modality,
            disable=not progress,
        )
        with bar, torch.inference_mode():
            for index in self.plan_batches(items, size):
                vectors = self._embed_batch([items[i] for i in index])
                out[index] = vectors.to(torch.float32).numpy()
                bar.update(len(index))
        return out

    def plan_batches(self, items: Sequence[Any], batch_size: int) -> list[np.ndarray]:
        """The item indices of each batch ``embed`` runs, in order (all items exactly once)."""
        order = self._order(items)
        return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]

    def _order(self, items: Sequence[Any]) -> np.ndarray:
        return np.arange(len(items))

    @abstractmethod
    def _validate(self, items: list[Any]) -> None:
        """Raise DataError naming the first unusable item."""

    @abstractmethod
    def _embed_batch(self, items: list[Any]) -> torch.Tensor:
        """Embed one batch (called under inference mode); returns [len(items), dim]."""

    @abstractmethod
    def _settings(self) -> dict[str, Any]:
        """The pooling and preprocessing part of ``identity()``."""

    def _probe_dim(self, item: Any) -> int:
        """Embed one item to check the pipeline end to end and learn the output size."""
        try:
            with torch.inference_mode():
                vector = self._embed_batch([item])
        except (RuntimeError, ValueError, TypeError, IndexError, AttributeError) as exc:
            raise ConfigError(
                f"encoder {self.source!r}: test forward pass as a {self.modality} model failed: {_first_line(exc)}"
            ) from exc
        return int(vector.shape[1])


def _freeze(model: nn.Module) -> Any:
    """Eval mode, no gradients: the encoder is never trained."""
    model.eval()
    model.requires_grad_(False)
    return model


def _forward_params(model: nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def _check_choice(value: str, choices: Sequence[str], field: str, source: str) -> str:
    if value not in choices:
        raise ConfigError(
            f"encoder {source!r}: {field} must be one of {', '.join(choices)}, got {value!r}"
        )
    return value


def _check_batch_size(batch_size: int) -> int:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
