"""Small embedded datasets for training tests: labelled image (12-d) and text (8-d) embeddings."""

from __future__ import annotations

import numpy as np

from common.embedding import EmbeddedDataset


def clustered(n: int = 256, *, classes: int = 4, seed: int = 0) -> EmbeddedDataset:
    """Image and text embeddings clustered by class around shared centres (every image row unique)."""
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
    )
