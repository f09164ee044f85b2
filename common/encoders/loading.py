"""``load_encoder``: one entry point from an encoder spec to a frozen Encoder, and its weight files."""

from __future__ import annotations

from pathlib import Path

from common.encoders.base import MODALITIES, Encoder
from common.encoders.huggingface import (
    _LOAD_ERRORS,
    _HFSource,
    _load_hf,
    _model_files,
    _resolve_hf_source,
    _weights_dir,
)
from common.encoders.packaged import (
    EfficientNetLite0Encoder,
    MobileNetV2Encoder,
    _efficientnet_weights,
    _minilm_dir,
    _mobilenet_file,
    _require_efficientnet,
)
from common.encoders.runtime import check_choice
from common.errors import ConfigError


def load_encoder(
    spec: str,
    *,
    modality: str | None = None,
    pooling: str | None = None,
    max_length: int = 256,
    image_size: int | None = None,
    batch_size: int | None = None,
    precision: str = "auto",
    device: str = "auto",
) -> Encoder:
    """Load a frozen encoder from a packaged name, a local model directory or a Hugging Face id.

    Packaged names: "minilm" (all-MiniLM-L6-v2, 384-d text), "mobilenetv2" (ImageNet, 1280-d image,
    224 px unless ``image_size``), "efficientnet-lite0" (1280-d image; needs two extra packages).
    Local directories load with ``local_files_only``; ids go to Hugging Face (its cache, or the
    network when allowed). ``modality`` is inferred from the model config when not given.
    ``max_length`` applies to text, ``image_size`` to images. ``precision`` (auto, fp32, bf16) and
    ``device`` (auto, cpu, cuda): see ``common.encoders.runtime``. Bad specs raise ConfigError.
    """
    if not spec.strip():
        raise ConfigError(
            "encoder spec is empty: give a packaged name, a model directory or a Hugging Face id"
        )
    if modality is not None:
        check_choice(modality, MODALITIES, "modality", spec)
    name = spec.strip().lower()
    if name == "minilm":
        _require_modality(spec, modality, "text")
        return _load_hf(
            _HFSource(spec="minilm", location=str(_minilm_dir()), local=True, label="minilm"),
            modality="text",
            pooling=pooling,
            max_length=max_length,
            image_size=image_size,
            batch_size=batch_size,
            precision=precision,
            device=device,
        )
    if name in ("mobilenetv2", "efficientnet-lite0"):
        _require_modality(spec, modality, "image")
        if pooling not in (None, "mean", "gap"):
            raise ConfigError(
                f"encoder {spec!r}: only pooling 'mean' (global average) is available, got {pooling!r}"
            )
        if name == "mobilenetv2":
            return MobileNetV2Encoder(
                _mobilenet_file(),
                image_size=image_size or 224,
                batch_size=batch_size,
                precision=precision,
                device=device,
            )
        return EfficientNetLite0Encoder(
            image_size=image_size or 224,
            batch_size=batch_size,
            precision=precision,
            device=device,
        )
    return _load_hf(
        _resolve_hf_source(spec),
        modality=modality,
        pooling=pooling,
        max_length=max_length,
        image_size=image_size,
        batch_size=batch_size,
        precision=precision,
        device=device,
    )


def _require_modality(spec: str, modality: str | None, expected: str) -> None:
    if modality not in (None, expected):
        raise ConfigError(
            f"encoder {spec!r} is a {expected} encoder, but modality {modality!r} was asked for"
        )


def weight_files(spec: str) -> list[Path]:
    """The files whose ``fingerprint_files`` is ``load_encoder(spec).identity()["weights"]``,
    found without loading the model (a site checks its data bundle against them)."""
    name = spec.strip().lower()
    if name == "minilm":
        return _model_files(_minilm_dir())
    if name == "mobilenetv2":
        return [_mobilenet_file()]
    if name == "efficientnet-lite0":
        _require_efficientnet()
        return [_efficientnet_weights()]
    source = _resolve_hf_source(spec)
    try:
        return _model_files(_weights_dir(source))
    except _LOAD_ERRORS as exc:
        raise source.failure("config", exc) from exc
