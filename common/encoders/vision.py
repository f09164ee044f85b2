"""Image encoders: shared torch preprocessing and Hugging Face vision backbones."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.encoders.base import Encoder, _first_line, _forward_params, _freeze
from common.encoders.onnx import OnnxNetwork
from common.encoders.runtime import check_choice, keep_convolutions_faithful
from common.errors import ConfigError, DataError

IMAGE_POOLINGS = ("pooled", "cls", "mean", "gap")

IMAGENET_MEAN = (0.485, 0.456, 0.406)

IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageEncoder(Encoder):
    """Base for image encoders: shared torch preprocessing, subclasses run the network.

    Preprocessing (no torchvision, no image processor): uint8 input is divided by 255;
    grayscale becomes 3 channels; each image is resized to ``image_size`` x ``image_size``
    (bilinear, antialiased where an axis shrinks; the aspect ratio is not kept, no crop); then
    ``(x * value_scale - mean) / std`` per channel.
    """

    modality = "image"
    model: Any  # the network forward_pixels runs (set by each subclass before _setup)

    def __init__(
        self,
        *,
        source: str,
        weight_files: Sequence[Path],
        image_size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        value_scale: float = 1.0,
        batch_size: int | None = None,
        precision: str = "auto",
        device: str = "auto",
    ) -> None:
        super().__init__(
            source=source,
            weight_files=weight_files,
            batch_size=batch_size,
            precision=precision,
            device=device,
        )
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
        self._onnx: OnnxNetwork | None = None

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Model input [B, 3, image_size, image_size] for a batch of images (channels-last memory
        for torch, contiguous NCHW for ONNX Runtime).

        Images of one shape and dtype are resized together (the same values as one by one)."""
        size = self.image_size
        pixels = torch.empty((len(images), 3, size, size), dtype=torch.float32)
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault((image.shape, image.dtype.str), []).append(i)
        for rows in groups.values():
            pixels[rows] = _resize_to_rgb(np.stack([images[i] for i in rows]), size)
        if self.value_scale != 1.0:
            pixels.mul_(self.value_scale)
        pixels.sub_(self._mean).div_(self._std)  # in place: no batch-sized temporaries
        runtime = getattr(self, "runtime", None)  # None while the probe's inputs are made
        if runtime is not None and runtime.backend == "onnxruntime":  # it takes NCHW
            return pixels
        return pixels.contiguous(memory_format=torch.channels_last)

    @abstractmethod
    def forward_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Run the network on preprocessed pixels; returns [B, dim]."""

    def _inputs(self, items: list[Any]) -> torch.Tensor:
        return self.preprocess(items)

    def _forward(self, inputs: Any) -> torch.Tensor:
        if self.runtime.backend == "onnxruntime":
            if self._onnx is None:  # exported once, at the probe
                self._onnx = OnnxNetwork(
                    self.model, self.forward_pixels, inputs, threads=torch.get_num_threads()
                )
            return self._onnx(inputs)
        return self.forward_pixels(inputs.to(self.runtime.device))

    def _setup(self, model: nn.Module) -> int:
        # Convolutions run fastest on NHWC data (oneDNN on CPU, cuDNN on GPU); a ViT's patch
        # embedding is one convolution, so this is harmless there. Under bf16 the convolutions
        # that lose accuracy stay in float32 (keep_convolutions_faithful).
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # in place
        dim = super()._setup(keep_convolutions_faithful(model))
        # ONNX Runtime's threads run the network while the loader thread resizes the next batch
        # (measured faster end to end); torch keeps resizing between batches on its own threads.
        self.inputs_in_background = self.runtime.backend == "onnxruntime"
        if self.runtime.backend != "onnxruntime":
            self._onnx = None  # a probe that lost to torch: drop its session and weights
        return dim

    def _load(self, item: Any, index: int) -> np.ndarray:
        image = item.load() if hasattr(item, "load") else item
        shape = getattr(image, "shape", None)
        if not isinstance(image, np.ndarray) or not (
            len(image.shape) == 2 or (len(image.shape) == 3 and image.shape[2] in (1, 3))
        ):
            raise DataError(
                f"image item {index}: expected an (H, W) or (H, W, 3) array, got shape {shape}"
            )
        if min(image.shape[:2]) < 1 or not np.isfinite(image).all():
            raise DataError(f"image item {index}: empty or non-finite pixels (shape {image.shape})")
        return image

    def _probe_items(self) -> list[np.ndarray]:
        """Eight smooth random images (six grey, two colour; seed 0). No blank image: its
        features are near zero, so its cosine says little about real inputs."""
        rng = np.random.default_rng(0)
        images: list[np.ndarray] = []
        for k in range(8):
            coarse = rng.random((8, 8, 3 if k >= 6 else 1)).astype(np.float32)
            fine = np.kron(coarse, np.ones((8, 8, 1), dtype=np.float32))
            noisy = 0.8 * fine + 0.2 * rng.random(fine.shape).astype(np.float32)
            images.append(noisy if k >= 6 else noisy[..., 0])
        return images

    def _preprocessing(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "resize": "bilinear-antialias-when-shrinking-square",
            "mean": list(self.mean),
            "std": list(self.std),
            "value_scale": self.value_scale,
        }


def _resize_to_rgb(images: np.ndarray, size: int) -> torch.Tensor:
    """Images of one shape [n, H, W] / [n, H, W, 1] / [n, H, W, 3] -> float32 [n, 3, size, size]
    in the input's range (uint8 is divided by 255)."""
    array = (
        images.astype(np.float32) / 255.0
        if images.dtype == np.uint8
        else np.asarray(images, dtype=np.float32)
    )
    if not array.flags.writeable:
        array = array.copy()
    tensor = torch.from_numpy(array)
    tensor = tensor[:, None] if tensor.ndim == 3 else tensor.permute(0, 3, 1, 2)
    if tuple(tensor.shape[2:]) != (size, size):
        # Antialiasing changes nothing when enlarging (the filter's support stays one pixel)
        # but costs 30% more time: only when an axis shrinks (up to float rounding, the same).
        tensor = F.interpolate(
            tensor,
            size=(size, size),
            mode="bilinear",
            antialias=max(tensor.shape[2:]) > size,
            align_corners=False,
        )
    return tensor.expand(-1, 3, -1, -1) if tensor.shape[1] == 1 else tensor


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
        batch_size: int | None = None,
        precision: str = "auto",
        device: str = "auto",
    ) -> None:
        super().__init__(
            source=source,
            weight_files=weight_files,
            image_size=image_size,
            mean=mean,
            std=std,
            value_scale=value_scale,
            batch_size=batch_size,
            precision=precision,
            device=device,
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
            check_choice(pooling, IMAGE_POOLINGS, "pooling", source)
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
        self.dim = self._setup(self.model)

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
            return outputs.pooler_output.flatten(1).float()
        hidden = outputs.last_hidden_state.float()
        if self.pooling == "cls":
            return hidden[:, 0]
        return hidden.mean(dim=(2, 3)) if hidden.ndim == 4 else hidden.mean(dim=1)

    def _settings(self) -> dict[str, Any]:
        return {
            "model_type": getattr(self.model.config, "model_type", None),
            "pooling": self.pooling,
            **self._preprocessing(),
        }


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
