"""Frozen encoders (packaged offline models, Hugging Face ids, local directories) behind one interface.

Modules: ``base`` (the Encoder interface), ``text`` (HF text models, pooling), ``vision`` (image
preprocessing, HF vision backbones), ``packaged`` (the pip-installed offline models),
``mobilenet`` (the MobileNetV2 network), ``huggingface`` (loading HF models), ``loading``
(``load_encoder``, ``weight_files``), ``fingerprint`` (weight-file fingerprints).
"""

from common.encoders.base import ENCODER_CODE_VERSION, MODALITIES, Encoder
from common.encoders.fingerprint import fingerprint_files
from common.encoders.huggingface import infer_modality
from common.encoders.loading import load_encoder, weight_files
from common.encoders.packaged import (
    PACKAGED_ENCODERS,
    EfficientNetLite0Encoder,
    MobileNetV2Encoder,
)
from common.encoders.text import TEXT_POOLINGS, HFTextEncoder, is_decoder_only, pool_tokens
from common.encoders.vision import (
    IMAGE_POOLINGS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    HFVisionEncoder,
    ImageEncoder,
    vision_preprocessing,
)

__all__ = [
    "ENCODER_CODE_VERSION",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_POOLINGS",
    "MODALITIES",
    "PACKAGED_ENCODERS",
    "TEXT_POOLINGS",
    "EfficientNetLite0Encoder",
    "Encoder",
    "HFTextEncoder",
    "HFVisionEncoder",
    "ImageEncoder",
    "MobileNetV2Encoder",
    "fingerprint_files",
    "infer_modality",
    "is_decoder_only",
    "load_encoder",
    "pool_tokens",
    "vision_preprocessing",
    "weight_files",
]
