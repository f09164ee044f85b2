"""Small embedded datasets for training tests: labelled image (12-d) and text (8-d) embeddings."""

from __future__ import annotations

import numpy as np

from common.embedding import EmbeddedDataset


def clustered(
    n: int = 256, *, classes: int = 4, seed: int = 0, prompts: bool = False
) -> EmbeddedDataset:
    """Image and text embeddings clustered by class around shared centres (every image row unique);
    ``prompts``: with class prompts (each class's text centre plus noise), as a text encoder gives."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centers = rng.normal(size=(classes, 12))
    image = 2 * centers[labels] + rng.normal(size=(n, 12))
    text = 2 * centers[labels][:, :8] + rng.normal(size=(n, 8))
    return EmbeddedDataset(
        ids=[str(i) for i in range(n)],
        image=image.astype(np.float32),
        text=text.astype(np.float32),
        labels=labels,
        class_names=[f"c{i}" for i in range(classes)],
        prompts=(2 * centers[:, :8] + 0.3 * rng.normal(size=(classes, 8))).astype(np.float32)
        if prompts
        else None,
        classes_declared=True,  # fixed by the test, as a built-in dataset's are
    )
