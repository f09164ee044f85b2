"""Paired bootstrap replicates of the validation metrics: each replicate reweights the rows by a
multinomial resample (``bootstrap_weights``), and every metric is recomputed under those weights
from per-row quantities that do not depend on the resample (a query's hit, a row's zero-shot
score or probe prediction). Two heads scored with the same weights give paired replicates, so
``P(candidate > start)`` over them says whether a difference on a small validation split is more
than noise (``common.head_start.beats_start``).
"""

from __future__ import annotations

import numpy as np

from common.metrics.inputs import MetricInputError


def bootstrap_weights(n: int, replicates: int, *, seed: int) -> np.ndarray:
    """[replicates, n] multinomial counts (each row sums to ``n``): a resample of ``n`` rows with
    replacement per replicate, the same for every caller with the same ``(n, replicates, seed)``."""
    if n < 1 or replicates < 1:
        raise MetricInputError(f"bootstrap: needs rows and replicates, got n={n}, {replicates}")
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=replicates).astype(np.float64)


def weighted_mean(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[B]: the mean of the per-row ``values`` under each replicate's row weights."""
    return (weights @ np.asarray(values, dtype=np.float64)) / weights.sum(axis=1)


def weighted_auroc(positive: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[B]: the AUROC of ``scores`` for the boolean labels ``positive`` with each row counted as
    often as its weight (ties half, as ``common.metrics.zeroshot.auroc``, which it equals at unit
    weights); nan in a replicate without both labels."""
    positive = np.asarray(positive, dtype=bool)
    order = np.argsort(np.asarray(scores, dtype=np.float64), kind="mergesort")
    sorted_scores = np.asarray(scores, dtype=np.float64)[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    w = weights[:, order]
    pos = positive[order]
    w_pos = np.add.reduceat(w * pos, starts, axis=1)  # [B, tie groups]
    w_neg = np.add.reduceat(w * ~pos, starts, axis=1)
    below = np.cumsum(w_neg, axis=1) - w_neg  # negatives strictly below each tie group
    total_pos, total_neg = w_pos.sum(axis=1), w_neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (w_pos * (below + 0.5 * w_neg)).sum(axis=1) / (total_pos * total_neg)
    return np.where((total_pos > 0) & (total_neg > 0), auc, np.nan)


def weighted_macro_f1(y_true: np.ndarray, y_pred: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[B]: macro-F1 over the classes that occur (as truth or prediction) in each replicate, rows
    counted by weight (scikit-learn's ``f1_score(average="macro", zero_division=0)`` at unit
    weights)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    classes = np.union1d(y_true, y_pred)
    truth = (y_true[:, None] == classes[None, :]).astype(np.float64)  # [n, C]
    predicted = (y_pred[:, None] == classes[None, :]).astype(np.float64)
    tp = weights @ (truth * predicted)  # [B, C]
    support, claimed = weights @ truth, weights @ predicted
    denominator = support + claimed
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(denominator > 0, 2.0 * tp / denominator, 0.0)
    occurs = denominator > 0
    return (f1 * occurs).sum(axis=1) / np.maximum(occurs.sum(axis=1), 1)
