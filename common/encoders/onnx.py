"""A frozen network exported once to ONNX and run by ONNX Runtime on the CPU (float32).

Where it is used: ``common.encoders.runtime.choose_runtime`` picks this backend for encoders that
declare ``onnx_capable`` (the packaged MobileNetV2) on a CPU, in fp32, when ONNX Runtime is
installed and its probe embeddings match torch's fp32 ones. Measured on this project's 2-core
AVX-512 machines (docs/results/bench_onnx_runtime.md): MobileNetV2 at 224 px 244 images/s vs 147
for torch's fastest faithful form (bf16), identical embeddings (cosine 1.00000); for MiniLM ONNX
Runtime fp32 is no faster than torch fp32 and slower than torch bf16, so text stays on torch.
``FEDEMBED_ONNXRUNTIME=0`` keeps every encoder on torch.

The export is the TorchScript exporter's (``torch.onnx.export(dynamo=False)``: it needs the
``onnx`` package, not ``onnxscript``), in memory, each time an encoder is loaded (under a second
for MobileNetV2 on an idle machine; a few seconds under load); nothing is written to disk.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

ONNX_ENV = "FEDEMBED_ONNXRUNTIME"
"""Set to 0 to run every encoder with torch (see ``onnxruntime_enabled``)."""

OPSET = 17


def onnxruntime_enabled() -> bool:
    """Whether encoders may run on ONNX Runtime here: it and ``onnx`` are installed and
    ``FEDEMBED_ONNXRUNTIME`` is not 0."""
    if os.environ.get(ONNX_ENV, "1") == "0":
        return False
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


def onnx_versions() -> str:
    """The versions an export's outcome depends on (torch's exporter, onnx, ONNX Runtime)."""
    names = ("torch", "onnx", "onnxruntime")
    versions = []
    for name in names:
        try:
            versions.append(f"{name}-{importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name}-none")
    return ",".join(versions)


class _Exported(nn.Module):
    """The encoder's network and pooling as one module: what is traced."""

    def __init__(self, network: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.network = network  # registered, so its weights become the graph's initialisers
        self._run = forward

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._run(pixels)


class OnnxNetwork:
    """``forward(pixels)`` of an image encoder, exported and run by ONNX Runtime (float32).

    ``network`` is the module whose weights ``forward`` uses; ``example`` one preprocessed batch
    (its shape, not its values, matters: the batch size is dynamic, the image size fixed).
    Raises RuntimeError when ONNX Runtime cannot be imported, or the export, the session or a
    run fails.
    """

    def __init__(
        self,
        network: nn.Module,
        forward: Callable[[torch.Tensor], torch.Tensor],
        example: torch.Tensor,
        *,
        threads: int,
    ) -> None:
        try:
            import onnxruntime as ort
        except (ImportError, OSError) as exc:  # installed but unusable (a missing library)
            raise RuntimeError(f"ONNX Runtime cannot be imported: {exc}") from exc
        exported = _Exported(network, forward)
        training = network.training
        graph = io.BytesIO()
        try:
            with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notes
                # the exporter restores each module's mode from the wrapper's: evaluate both
                exported.eval()
                torch.onnx.export(
                    exported,
                    (torch.zeros(example.shape, dtype=torch.float32),),
                    graph,  # type: ignore[arg-type]  # the TorchScript exporter writes to any file object
                    input_names=["pixels"],
                    output_names=["embedding"],
                    dynamic_axes={"pixels": {0: "batch"}, "embedding": {0: "batch"}},
                    opset_version=OPSET,
                    dynamo=False,
                )
        except Exception as exc:  # the exporter raises many kinds; the caller falls back
            raise RuntimeError(f"ONNX export failed: {exc}") from exc
        finally:
            network.train(training)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        # idle threads sleep instead of spinning: the loader thread decodes the next batch
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session: Any = ort.InferenceSession(
                graph.getvalue(), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime's own exception types
            raise RuntimeError(f"ONNX Runtime session failed: {exc}") from exc

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        array = pixels.to(device="cpu", dtype=torch.float32).contiguous().numpy()
        try:
            outputs = self.session.run(None, {"pixels": array})
        except Exception as exc:  # onnxruntime's own exception types
            raise RuntimeError(f"ONNX Runtime run failed: {exc}") from exc
        return torch.from_numpy(outputs[0])
