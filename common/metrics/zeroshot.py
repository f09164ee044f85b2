"""Zero-shot classification by cosine similarity to class-prompt embeddings."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import roc_auc_score

from common.metrics.inputs import (
    MetricInputError,
    _l2_normalize,
    _labels,
    _matrix,
    _same_columns,
)


def zero_shot(image_z: np.ndarray, prompt_z: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Zero-shot classification by cosine similarity between embeddings and class prompts.

    ``prompt_z[c]`` embeds class ``c``'s prompt; ``labels`` are class indices in [0, C).
    ``zs_acc``: accuracy of the argmax-cosine class. ``zs_auroc``: macro one-vs-rest AUROC with
    the raw cosine to each class prompt as that class's score, over the classes present in
    ``labels`` (absent classes are skipped); nan when fewer than two classes are present.
    """
    x = _matrix(image_z, "image_z")
    prompts = _matrix(prompt_z, "prompt_z")
    _same_columns(x, "image_z", prompts, "prompt_z")
    y = _labels(labels, "labels", x.shape[0])
    if y.max() >= prompts.shape[0]:
        raise MetricInputError(
            f"labels: contains class {int(y.max())} but prompt_z has only {prompts.shape[0]} rows"
        )
    scores = _l2_normalize(x) @ _l2_normalize(prompts).T
    accuracy = float(np.mean(scores.argmax(axis=1) == y))
    present = np.unique(y)
    if present.size < 2:
        return {"zs_acc": accuracy, "zs_auroc": math.nan}
    aucs = [roc_auc_score(y == c, scores[:, c]) for c in present]
    return {"zs_acc": accuracy, "zs_auroc": float(np.mean(aucs))}
