"""How a frozen encoder runs on this machine: device, numeric precision, memory format, allocator.

An encoder's ``precision`` is ``fp32``, ``bf16`` (the network under bfloat16 autocast; inputs,
pooling and outputs stay float32) or ``auto``: bf16 where the device computes it natively and an
encoder-specific fidelity probe shows each probe item's bf16 embedding within cosine
``FIDELITY_MIN_COSINE`` of its fp32 embedding, fp32 otherwise. ``device`` is ``cpu``, ``cuda`` or
``auto`` (CUDA when present). The resolved device and precision are part of the encoder's
identity, hence of the embedding cache key: embeddings computed in different forms never mix.

An encoder that declares ``onnx_capable`` runs on ONNX Runtime instead of torch where that is
faster and equal (``common.encoders.onnx``): on a CPU, precision ``auto`` or ``fp32``, ONNX
Runtime installed and enabled, and its probe embeddings within cosine ``ONNX_MIN_COSINE`` of
torch's fp32 ones (it is float32 too: only the kernels differ). The backend is then part of the
identity as well.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from common.encoders.onnx import onnx_versions, onnxruntime_enabled
from common.errors import ConfigError
from common.registries import ENCODER_DEVICES, ENCODER_PRECISIONS

PRECISIONS = ENCODER_PRECISIONS

DEVICES = ENCODER_DEVICES

FIDELITY_MIN_COSINE = 0.999
"""``auto`` keeps bf16 only if every fidelity-probe item's bf16 embedding has at least this cosine
with its fp32 embedding (the benchmark reports the same statistic on real inputs)."""

ONNX_MIN_COSINE = 0.99999
"""ONNX Runtime replaces torch fp32 only if every probe item's embedding has at least this cosine
with torch's (both float32: what differs is summation order and fused kernels)."""

BACKENDS = ("torch", "onnxruntime")

ALLOCATOR_ENV = "FEDEMBED_MALLOC_TUNING"
"""Set to 0 to leave glibc's allocator settings alone (see ``tune_allocator``)."""


def keep_convolutions_faithful(model: nn.Module) -> nn.Module:
    """Where bfloat16 loses accuracy in a CNN, keep float32 (in place; a no-op in fp32).

    Under bf16 autocast every convolution would compute and return bfloat16. Measured on
    MobileNetV2 (synthetic-radiology at 224 px, per-item cosine to fp32): that gives a minimum
    of 0.995; most of the error comes from grouped (depthwise) convolutions, whose few products
    per output are memory-bound anyway, and the rest from rounding activations to bf16 between
    layers. So grouped convolutions run in float32, and every other convolution computes in
    bf16 but hands float32 on: minimum cosine 0.9995, most of bf16's speed kept.
    """
    for module in model.modules():
        if not isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d) or getattr(
            module, "_fedembed_faithful", False
        ):
            continue
        module._fedembed_faithful = True  # type: ignore[assignment]
        if module.groups > 1:
            module.forward = _in_float32(module.forward)  # type: ignore[method-assign]
        else:
            module.register_forward_hook(_output_to_float32)
    return model


def _in_float32(forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., torch.Tensor]:
    def run(inputs: torch.Tensor) -> torch.Tensor:
        with torch.autocast(inputs.device.type, enabled=False):
            return forward(inputs.float())

    return run


def _output_to_float32(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    return output.float()


@dataclass(frozen=True)
class Runtime:
    """A resolved device and precision: ``device`` in cpu/cuda, ``precision`` in fp32/bf16, and
    the ``backend`` that runs the network (torch, or onnxruntime: CPU, fp32)."""

    device: str
    precision: str
    backend: str = "torch"

    def __post_init__(self) -> None:
        check_choice(self.backend, BACKENDS, "backend", "runtime")
        if self.backend == "onnxruntime" and (self.device, self.precision) != ("cpu", "fp32"):
            raise ConfigError("runtime: ONNX Runtime runs on the cpu in fp32 only")

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The context the network runs in (bfloat16 autocast, or nothing for fp32)."""
        if self.precision == "bf16":
            return torch.autocast(self.device, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def identity(self) -> dict[str, str]:
        backend = {} if self.backend == "torch" else {"backend": self.backend}
        return {"device": self.device, "precision": self.precision, **backend}


def resolve_device(device: str, *, source: str) -> str:
    """``auto`` -> cuda when torch sees a CUDA device, else cpu; ``cuda`` without one is an error."""
    check_choice(device, DEVICES, "device", source)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"encoder {source!r}: device 'cuda' asked for, but torch sees no CUDA device"
        )
    return device


def bf16_native(device: str) -> bool:
    """True if ``device`` computes bfloat16 in hardware (CPU: oneDNN's bf16 check, e.g.
    AVX-512 BF16 / AMX; CUDA: compute capability 8.0+)."""
    if device == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check is not None and check())


def runtime_key(precision: str, device: str) -> str:
    """What the resolution of (``precision``, ``device``) depends on besides the model: recorded
    wherever an encoder is known without loading it, so a cache moved to a machine of another
    kind resolves again."""
    check_choice(precision, PRECISIONS, "precision", "runtime")
    resolved = resolve_device(device, source="runtime")
    onnx = onnx_versions() if onnxruntime_enabled() else "torch-only"
    return f"{precision}:{resolved}:{'bf16' if bf16_native(resolved) else 'no-bf16'}:{onnx}"


def choose_runtime(
    precision: str,
    device: str,
    *,
    source: str,
    embed_probe: Callable[[Runtime], torch.Tensor],
    onnx_capable: bool = False,
) -> tuple[Runtime, dict[str, float] | None]:
    """Resolve ``precision`` / ``device`` (and, for an ``onnx_capable`` encoder, the backend);
    also return the probe's cosines where a probe ran (None otherwise).

    ``embed_probe(runtime)`` embeds the encoder's fixed probe items in that form ([k, dim]); it
    raises ConfigError when the form fails (an ONNX export that fails leaves torch in charge).
    """
    check_choice(precision, PRECISIONS, "precision", source)
    if not (
        onnx_capable
        and precision in ("auto", "fp32")
        and resolve_device(device, source=source) == "cpu"
        and onnxruntime_enabled()
    ):
        return _torch_runtime(precision, device, source=source, embed_probe=embed_probe)
    exact = embed_probe(Runtime("cpu", "fp32")).float()
    try:
        fast = embed_probe(Runtime("cpu", "fp32", "onnxruntime")).float()
    except ConfigError as exc:  # the import, export, session or run failed: torch runs it
        warnings.warn(
            f"encoder {source!r}: not on ONNX Runtime ({exc}); torch runs it", stacklevel=2
        )
        return _torch_runtime(precision, device, source=source, embed_probe=embed_probe)
    cosines = torch.nn.functional.cosine_similarity(exact, fast, dim=1)
    if not (bool(torch.isfinite(cosines).all()) and float(cosines.min()) >= ONNX_MIN_COSINE):
        warnings.warn(
            f"encoder {source!r}: not on ONNX Runtime (probe cosine to torch fp32 "
            f"{float(cosines.min()):.6f} < {ONNX_MIN_COSINE}); torch runs it",
            stacklevel=2,
        )
        return _torch_runtime(precision, device, source=source, embed_probe=embed_probe)
    return Runtime("cpu", "fp32", "onnxruntime"), {"onnxruntime_min_cosine": float(cosines.min())}


def _torch_runtime(
    precision: str,
    device: str,
    *,
    source: str,
    embed_probe: Callable[[Runtime], torch.Tensor],
) -> tuple[Runtime, dict[str, float] | None]:
    check_choice(precision, PRECISIONS, "precision", source)
    resolved = resolve_device(device, source=source)
    if precision == "bf16" and not bf16_native(resolved):
        raise ConfigError(
            f"encoder {source!r}: precision 'bf16' asked for, but this {resolved} has no native "
            "bfloat16 (it would be slower than fp32); use fp32 or auto"
        )
    if precision != "auto":
        return Runtime(resolved, precision), None
    if not bf16_native(resolved):
        return Runtime(resolved, "fp32"), None
    exact = embed_probe(Runtime(resolved, "fp32")).float()
    reduced = embed_probe(Runtime(resolved, "bf16")).float()
    cosines = torch.nn.functional.cosine_similarity(exact, reduced, dim=1)
    fidelity = {"min_cosine": float(cosines.min()), "median_cosine": float(cosines.median())}
    keep = bool(torch.isfinite(cosines).all()) and fidelity["min_cosine"] >= FIDELITY_MIN_COSINE
    return Runtime(resolved, "bf16" if keep else "fp32"), fidelity


_TUNED = False


def tune_allocator() -> bool:
    """Let glibc's malloc keep freed large blocks for reuse (process-wide, once).

    A CNN at batch 32 allocates and frees activation buffers of tens of MB per layer. glibc
    serves each from a fresh ``mmap`` and returns it on free, so every buffer is page-faulted and
    zeroed again: at 224 px MobileNetV2 spent more system than user CPU time (benchmark). Raising
    the mmap and trim thresholds keeps those pages in the heap. The cost is memory already used
    at peak staying reserved. No-op off glibc or with ``FEDEMBED_MALLOC_TUNING=0``; returns
    whether the settings are (now) in effect.
    """
    global _TUNED
    if _TUNED:
        return True
    if os.environ.get(ALLOCATOR_ENV, "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        gnu_get_libc_version = libc.gnu_get_libc_version  # glibc only
    except (OSError, AttributeError):
        return False
    del gnu_get_libc_version
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    _TUNED = bool(mallopt(m_mmap_threshold, 2**31 - 1)) and bool(
        mallopt(m_trim_threshold, 2**31 - 1)
    )
    return _TUNED


def check_choice(value: str, choices: Sequence[str], field: str, source: str) -> str:
    """``value`` if it is one of ``choices``, else ConfigError naming the encoder and field."""
    if value not in choices:
        raise ConfigError(
            f"encoder {source!r}: {field} must be one of {', '.join(choices)}, got {value!r}"
        )
    return value
