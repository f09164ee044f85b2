"""The Encoder interface every frozen encoder implements, and the checks all of them share."""

from __future__ import annotations

import copy
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from common.encoders.fingerprint import fingerprint_files
from common.encoders.runtime import Runtime, choose_runtime, tune_allocator
from common.errors import ConfigError, DataError

# Bump whenever a change in this package can change embedding values.
ENCODER_CODE_VERSION = 5  # 5: texts in bf16 batch by 64 (bf16 sums may differ by batch)

MODALITIES = ("text", "image")


def default_batch_size(modality: str, runtime: Runtime) -> int:
    """Items per batch when the caller does not say: the faster size of the embedding
    benchmark's bare loops on a 2-core CPU (docs/results/bench_embedding.md). Texts in bf16: 64
    (MiniLM 201 texts/s vs 193 at 32); texts in fp32: 32 (116 vs 103 at 64); images: 32
    (MobileNetV2 bf16 147 vs 131 at 64, fp32 133 vs 131, equal on ONNX Runtime)."""
    return 64 if modality == "text" and runtime.precision == "bf16" else 32


class Encoder(ABC):
    """A frozen model mapping items of one modality to float32 vectors of size ``dim``.

    ``embed`` runs in batches under ``torch.inference_mode()`` with the model in eval mode and
    gradients off; the same items in the same order and batch size give bitwise-identical output
    run to run. Each batch's items are loaded (image files read, checked and decoded; texts
    checked and tokenised) in one background thread while the network runs the previous batch;
    image resizing stays on the calling thread for a torch network, with torch's own threads (a
    second torch thread team would compete with the network's for the cores: measured slower),
    and moves to the loading thread for an ONNX Runtime network (measured faster). The network
    runs on the resolved ``runtime`` (device, precision and backend: see
    ``common.encoders.runtime``), which is part of ``identity()``. The encoder never changes torch's thread settings; it does tune glibc's
    allocator once per process (``tune_allocator``).
    """

    modality: str
    dim: int
    runtime: Runtime
    # Whether ``_inputs`` also runs in the loading thread: where it uses no torch threads
    # (tokenising), or where the network does not either (ONNX Runtime; set after setup).
    inputs_in_background: bool = False
    fidelity: dict[str, float] | None = None  # the auto precision probe's cosines, when run
    onnx_capable = False  # measured faster on ONNX Runtime (common.encoders.onnx): may run there

    def __init__(
        self,
        *,
        source: str,
        weight_files: Sequence[Path],
        batch_size: int | None,
        precision: str = "auto",
        device: str = "auto",
    ) -> None:
        self.source = source
        self.weight_files = tuple(weight_files)
        self._batch_size = None if batch_size is None else _check_batch_size(batch_size)
        self._requested = (precision, device)
        self._identity: dict[str, Any] | None = None
        tune_allocator()

    @property
    def batch_size(self) -> int:
        """Items per ``embed`` batch: the caller's, else ``default_batch_size`` for the runtime."""
        if self._batch_size is not None:
            return self._batch_size
        return default_batch_size(self.modality, self.runtime)

    def identity(self) -> dict[str, Any]:
        """JSON-able description that changes whenever ``embed`` could return different values.

        Holds the code version, the source, a fingerprint of the weight files (see
        ``fingerprint_files``), the output size and dtype, the device, precision and (when not
        torch) backend the network runs on, and the pooling and preprocessing.
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
                **self.runtime.identity(),
                **self._settings(),
            }
        return copy.deepcopy(self._identity)

    def embed(
        self,
        items: Sequence[Any],
        *,
        batch_size: int | None = None,
        progress: bool = False,
        on_error: Callable[[int, DataError], None] | None = None,
    ) -> np.ndarray:
        """Embed ``items``: texts, or images (float32 arrays (H, W) / (H, W, 3) in [0, 1], or
        objects whose ``load()`` returns one, e.g. ``ImageRef``: loaded one batch ahead, never
        all at once).

        Returns a float32 array [len(items), dim], row i for item i. An item that cannot be used
        raises DataError naming it; with ``on_error``, an item whose loading raises DataError is
        passed to ``on_error(index, error)`` instead and its row is NaN.
        """
        size = self.batch_size if batch_size is None else _check_batch_size(batch_size)
        out = np.empty((len(items), self.dim), dtype=np.float32)
        bar = tqdm(
            total=len(items),
            desc=f"{self.modality} embeddings",
            unit=self.modality,
            disable=not progress,
        )
        plan = self.plan_batches(items, size)

        def load(index: np.ndarray) -> tuple[np.ndarray, Any]:
            kept, loaded = self._load_batch(items, index, on_error)
            return kept, self._inputs(loaded) if self.inputs_in_background and kept.size else loaded

        with bar, ThreadPoolExecutor(1, thread_name_prefix="fedembed-load") as pool:
            pending = pool.submit(load, plan[0]) if plan else None
            for position in range(len(plan)):
                assert pending is not None
                index, loaded = pending.result()
                if position + 1 < len(plan):
                    pending = pool.submit(load, plan[position + 1])
                out[plan[position]] = np.nan
                if len(index):
                    with torch.inference_mode():
                        # preprocessing outside autocast: full precision
                        inputs = loaded if self.inputs_in_background else self._inputs(loaded)
                        with self.runtime.autocast():
                            vectors = self._forward(inputs)
                    out[index] = vectors.to(device="cpu", dtype=torch.float32).numpy()
                bar.update(len(plan[position]))
        return out

    def plan_batches(self, items: Sequence[Any], batch_size: int) -> list[np.ndarray]:
        """The item indices of each batch ``embed`` runs, in order (all items exactly once)."""
        order = self._order(items)
        return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]

    def _order(self, items: Sequence[Any]) -> np.ndarray:
        return np.arange(len(items))

    def _load_batch(
        self,
        items: Sequence[Any],
        index: np.ndarray,
        on_error: Callable[[int, DataError], None] | None,
    ) -> tuple[np.ndarray, list[Any]]:
        """Load and check the batch's items; returns the indices kept and their loaded items."""
        kept: list[int] = []
        loaded: list[Any] = []
        for i in index:
            try:
                loaded.append(self._load(items[int(i)], int(i)))
            except DataError as exc:
                if on_error is None:
                    raise
                on_error(int(i), exc)
                continue
            kept.append(int(i))
        return np.asarray(kept, dtype=np.int64), loaded

    def _load(self, item: Any, index: int) -> Any:
        """One item ready for ``_inputs`` (decoded, checked); DataError naming it if unusable."""
        return item

    @abstractmethod
    def _inputs(self, items: list[Any]) -> Any:
        """The network inputs of one batch of loaded items (CPU tensors)."""

    @abstractmethod
    def _forward(self, inputs: Any) -> torch.Tensor:
        """Run the network on one batch's inputs (under inference mode and the runtime's
        autocast; moves them to the runtime's device); returns [batch, dim]."""

    @abstractmethod
    def _settings(self) -> dict[str, Any]:
        """The pooling and preprocessing part of ``identity()``."""

    @abstractmethod
    def _probe_items(self) -> list[Any]:
        """Fixed items for the test forward pass and the auto precision fidelity probe."""

    def _setup(self, model: nn.Module) -> int:
        """Freeze ``model``, put it on the runtime's device and memory format, resolve the
        runtime, and return the output size learnt from a test forward pass."""
        precision, device = self._requested
        model = _freeze(model)
        try:
            probe = self._inputs(
                [self._load(item, i) for i, item in enumerate(self._probe_items())]
            )
        except DataError as exc:
            raise ConfigError(f"encoder {self.source!r}: probe inputs failed: {exc}") from exc

        outputs: dict[Runtime, torch.Tensor] = {}  # each form's probe embeddings, run once

        def embed_probe(runtime: Runtime) -> torch.Tensor:
            self.runtime = runtime
            model.to(runtime.device)
            if runtime in outputs:
                return outputs[runtime]
            try:
                with torch.inference_mode(), runtime.autocast():
                    outputs[runtime] = self._forward(probe).to("cpu", torch.float32)
                    return outputs[runtime]
            except (RuntimeError, ValueError, TypeError, IndexError, AttributeError) as exc:
                raise ConfigError(
                    f"encoder {self.source!r}: test forward pass as a {self.modality} model failed: {_first_line(exc)}"
                ) from exc

        runtime, self.fidelity = choose_runtime(
            precision,
            device,
            source=self.source,
            embed_probe=embed_probe,
            onnx_capable=self.onnx_capable,
        )
        return int(embed_probe(runtime).shape[1])


def _freeze(model: nn.Module) -> Any:
    """Eval mode, no gradients: the encoder is never trained."""
    model.eval()
    model.requires_grad_(False)
    return model


def _forward_params(model: nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def _check_batch_size(batch_size: int) -> int:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
