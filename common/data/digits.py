"""`digits`: scikit-learn's bundled 8x8 handwritten digits with captions, for fast smoke tests."""

from __future__ import annotations

import numpy as np
from PIL import Image

from common.data.dataset import ImageRef, SiteDataset
from common.errors import ConfigError

DATASET_NAME = "digits"
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CLASS_NAMES = [str(d) for d in range(10)]
CAPTION_TEMPLATES = (
    "a handwritten digit {word}",
    "a scanned image of the number {word}",
    "the digit {digit} written by hand",
    "a handwritten {digit}",
    "a low-resolution picture of a handwritten {word}",
)


def digit_prompt(digit: int) -> str:
    """Zero-shot prompt of a class, e.g. "a handwritten digit seven"."""
    return CAPTION_TEMPLATES[0].format(word=DIGIT_WORDS[digit], digit=digit)


def load_digits_dataset(
    *, n: int | None = None, seed: int = 0, image_size: int | None = None
) -> SiteDataset:
    """The 1,797 digits as (H, W) float32 images in [0, 1] with captions and labels 0-9.

    ``image_size`` upsamples the 8x8 images (bilinear; None keeps 8x8); ``n`` keeps a seeded
    random subset (in the original order). Caption wording is drawn from CAPTION_TEMPLATES
    with ``seed``.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.asarray(bunch.images, dtype=np.float32) / 16.0
    targets = np.asarray(bunch.target, dtype=np.int64)
    rng = np.random.default_rng(seed)
    indices = np.arange(len(targets))
    if n is not None:
        if not 0 < n <= len(targets):
            raise ConfigError(f"n must be in 1..{len(targets)} for {DATASET_NAME}, got {n}")
        indices = np.sort(rng.choice(len(targets), size=n, replace=False))
    if image_size is not None and image_size < 8:
        raise ConfigError(f"image_size must be >= 8 for {DATASET_NAME}, got {image_size}")
    templates = rng.integers(len(CAPTION_TEMPLATES), size=len(indices))
    images = [_resize(pixels[i], image_size) for i in indices]
    return SiteDataset(
        name=DATASET_NAME,
        ids=[f"digit-{int(i):04d}" for i in indices],
        texts=[
            CAPTION_TEMPLATES[int(t)].format(word=DIGIT_WORDS[targets[i]], digit=int(targets[i]))
            for t, i in zip(templates, indices, strict=True)
        ],
        images=[ImageRef.from_array(image) for image in images],
        labels=targets[indices],
        class_names=list(CLASS_NAMES),
        prompts=[digit_prompt(d) for d in range(10)],
        classes_declared=True,
    )


def _resize(image: np.ndarray, size: int | None) -> np.ndarray:
    if size is None or size == image.shape[0]:
        return image
    resized = Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)
