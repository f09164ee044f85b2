"""Loading Hugging Face models (local directories or hub ids) as frozen encoders."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.encoders.base import Encoder, _first_line
from common.encoders.packaged import PACKAGED_ENCODERS
from common.encoders.text import HFTextEncoder
from common.encoders.vision import HFVisionEncoder, vision_preprocessing
from common.errors import ConfigError

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


@dataclass(frozen=True)
class _HFSource:
    """Where a Hugging Face model comes from: a local directory or a hub id."""

    spec: str
    location: str
    local: bool
    label: str  # the identity's "source": packaged name, absolute directory or hub id

    def kwargs(self) -> dict[str, Any]:
        return {"local_files_only": True} if self.local else {}

    def failure(self, what: str, exc: BaseException) -> ConfigError:
        if self.local:
            return ConfigError(
                f"cannot load the {what} of encoder directory {self.location}: {_first_line(exc)}"
            )
        return ConfigError(
            f"cannot load encoder {self.spec!r}: not a packaged encoder ({', '.join(PACKAGED_ENCODERS)}), "
            f"not a local directory, and Hugging Face could not provide its {what} "
            f"(offline or unknown id): {_first_line(exc)}"
        )


def _resolve_hf_source(spec: str) -> _HFSource:
    path = Path(spec).expanduser()
    if path.is_dir():
        resolved = str(path.resolve())
        return _HFSource(spec=spec, location=resolved, local=True, label=resolved)
    if path.exists():
        raise ConfigError(
            f"encoder {spec!r}: {path.resolve()} is a file; expected a model directory"
        )
    if not _HUB_ID.fullmatch(spec):
        raise ConfigError(f"encoder directory not found: {path.resolve()}")
    return _HFSource(spec=spec, location=spec, local=False, label=spec)


_LOAD_ERRORS = (OSError, ValueError, KeyError, ImportError, RuntimeError, TypeError)


def _load_hf(
    source: _HFSource,
    *,
    modality: str | None,
    pooling: str | None,
    max_length: int,
    image_size: int | None,
    batch_size: int | None,
    precision: str = "auto",
    device: str = "auto",
) -> Encoder:
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(source.location, **source.kwargs())
    except _LOAD_ERRORS as exc:
        raise source.failure("config", exc) from exc
    modality = modality or infer_modality(config, source.spec)
    try:
        model, info = AutoModel.from_pretrained(
            source.location, dtype=torch.float32, output_loading_info=True, **source.kwargs()
        )
    except _LOAD_ERRORS as exc:
        raise source.failure("weights", exc) from exc
    missing = sorted(info.get("missing_keys", ())) + sorted(info.get("mismatched_keys", ()))
    random_weights = [key for key in missing if not str(key).startswith("pooler.")]
    if random_weights:
        raise ConfigError(
            f"encoder {source.spec!r}: the checkpoint lacks {len(random_weights)} weights of "
            f"{type(model).__name__} (e.g. {random_weights[0]}); they would be random"
        )
    files = _model_files(_weights_dir(source))
    if modality == "text":
        if getattr(config, "is_encoder_decoder", False):
            model = model.get_encoder()
        return HFTextEncoder(
            model,
            _load_tokenizer(source),
            source=source.label,
            weight_files=files,
            pooling=pooling,
            max_length=max_length,
            batch_size=batch_size,
            precision=precision,
            device=device,
        )
    size, mean, std, scale = vision_preprocessing(
        config, _read_json(source, "preprocessor_config.json"), image_size
    )
    return HFVisionEncoder(
        model,
        source=source.label,
        weight_files=files,
        image_size=size,
        mean=mean,
        std=std,
        value_scale=scale,
        pooling=pooling,
        pooler_loaded=not any(str(key).startswith("pooler.") for key in missing),
        batch_size=batch_size,
        precision=precision,
        device=device,
    )


def infer_modality(config: Any, spec: str) -> str:
    """ "image" for vision configs (image_size / num_channels, or a vision model type), else "text"."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_MAPPING_NAMES

    if hasattr(config, "vision_config") and hasattr(config, "text_config"):
        raise ConfigError(
            f"encoder {spec!r}: {config.model_type} is a joint vision-language model, which is not supported; "
            "use its text or vision tower on its own"
        )
    vision = getattr(config, "model_type", None) in MODEL_FOR_IMAGE_MAPPING_NAMES or any(
        hasattr(config, name) for name in ("image_size", "num_channels")
    )
    return "image" if vision else "text"


def _load_tokenizer(source: _HFSource) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.location, **source.kwargs())
    except _LOAD_ERRORS as exc:
        raise source.failure("tokenizer", exc) from exc


def _read_json(source: _HFSource, filename: str) -> dict[str, Any]:
    """A JSON file of the model (e.g. preprocessor_config.json), or {} when it has none."""
    from transformers.utils import cached_file

    try:
        path = cached_file(
            source.location,
            filename,
            _raise_exceptions_for_missing_entries=False,
            **source.kwargs(),
        )
    except _LOAD_ERRORS:
        return {}
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"encoder {source.spec!r}: unreadable {path}: {_first_line(exc)}"
        ) from exc
    return data if isinstance(data, dict) else {}


def _weights_dir(source: _HFSource) -> Path:
    """The directory holding the model's files (for a hub id: its snapshot in the HF cache)."""
    if source.local:
        return Path(source.location)
    from transformers.utils import cached_file

    path = cached_file(source.location, "config.json", **source.kwargs())
    if path is None:
        raise ConfigError(
            f"encoder {source.spec!r}: config.json vanished from the Hugging Face cache"
        )
    return Path(path).parent


def _model_files(directory: Path) -> list[Path]:
    """Every top-level file a model load can read (all but hidden files and Markdown)."""
    return sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() != ".md"
    )
