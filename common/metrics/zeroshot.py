"""Zero-shot classification by cosine similarity to class-prompt embeddings."""

from __future__ import annotations

import math

import numpy as np

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
    aucs = [auroc(y == c, scores[:, c]) for c in present]
    return {"zs_acc": accuracy, "zs_auroc": float(np.mean(aucs))}


def auroc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the boolean labels ``positive``: the Mann-Whitney
    U statistic, tied scores counted half (the value of scikit-learn's roc_auc_score, without
    importing scikit-learn in every site process). Needs both labels present."""
    positive = np.asarray(positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise MetricInputError("auroc: needs both positive and negative examples")
    order = np.argsort(scores, kind="mergesort")
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks = np.empty(scores.size)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)  # 1-based mean rank of each tie
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
