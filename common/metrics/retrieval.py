"""Retrieval recall@k by cosine similarity, with ties broken uniformly at random in expectation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.special import gammaln

from common.metrics.inputs import (
    MetricInputError,
    _int_vector,
    _ks,
    _l2_normalize,
    _matrix,
    _same_columns,
    _same_rows,
)

TIE_TOLERANCE = 1e-6
"""Cosine scores closer than this to the best correct item's score count as ties (see recall_at_k)."""

_CHUNK_ELEMENTS = 1 << 24  # similarity-matrix entries held at once (128 MB of float64)


def _paired_matrices(
    a: np.ndarray, name_a: str, b: np.ndarray, name_b: str
) -> tuple[np.ndarray, np.ndarray]:
    """Validate two embedding matrices whose rows are paired (same shape)."""
    a_arr, b_arr = _matrix(a, name_a), _matrix(b, name_b)
    _same_rows(a_arr, name_a, b_arr, name_b)
    _same_columns(a_arr, name_a, b_arr, name_b)
    return a_arr, b_arr


def _prob_correct_in_top(m: np.ndarray, n_correct: np.ndarray, n_wrong: np.ndarray) -> np.ndarray:
    """P(at least one of ``n_correct`` items lands in the first ``m`` of a random order.

    The items are ``n_correct + n_wrong`` tied candidates in uniformly random order; this is one
    minus the hypergeometric probability that the first ``m`` draws are all wrong:
    1 - C(n_wrong, m) / C(n_correct + n_wrong, m).
    """
    total = n_correct + n_wrong
    m = np.clip(m, 0, total)
    safe_m = np.minimum(m, n_wrong)
    log_none = (
        gammaln(n_wrong + 1.0)
        - gammaln(n_wrong - safe_m + 1.0)
        - gammaln(total + 1.0)
        + gammaln(total - safe_m + 1.0)
    )
    p_none = np.where(m > n_wrong, 0.0, np.exp(log_none))
    return np.where(m <= 0, 0.0, 1.0 - p_none)


def _correct_mask(rows: np.ndarray, groupings: Sequence[np.ndarray]) -> np.ndarray:
    """[len(rows), n] bool: gallery item j is correct for query i if any grouping matches."""
    mask = np.zeros((rows.shape[0], groupings[0].shape[0]), dtype=bool)
    for groups in groupings:
        mask |= groups[rows, None] == groups[None, :]
    return mask


def _query_hits(
    query: np.ndarray, gallery: np.ndarray, ks: tuple[int, ...], groupings: Sequence[np.ndarray]
) -> np.ndarray:
    """[len(ks), n_queries]: each query's expected hit at each k under uniformly random
    tie-breaking (its recall@k), computed in query chunks."""
    q = _l2_normalize(query)
    g = _l2_normalize(gallery)
    n = q.shape[0]
    hits = np.zeros((len(ks), n))
    step = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, n, step):
        rows = np.arange(start, min(start + step, n))
        scores = q[rows] @ g.T
        correct = _correct_mask(rows, groupings)
        best = np.where(correct, scores, -np.inf).max(axis=1, keepdims=True)
        above = ((scores > best + TIE_TOLERANCE) & ~correct).sum(axis=1)
        tied = np.abs(scores - best) <= TIE_TOLERANCE
        tied_correct = (tied & correct).sum(axis=1)
        tied_wrong = (tied & ~correct).sum(axis=1)
        for index, k in enumerate(ks):
            hits[index, rows] = _prob_correct_in_top(k - above, tied_correct, tied_wrong)
    return hits


def _recall(
    query: np.ndarray, gallery: np.ndarray, ks: tuple[int, ...], groupings: Sequence[np.ndarray]
) -> dict[str, float]:
    """Expected recall@k under uniformly random tie-breaking: the mean of ``_query_hits``."""
    hits = _query_hits(query, gallery, ks, groupings)
    return {f"R@{k}": float(hits[index].mean()) for index, k in enumerate(ks)}


def recall_at_k(
    query: np.ndarray,
    gallery: np.ndarray,
    *,
    ks: Sequence[int] = (1, 5, 10),
    groups: np.ndarray | None = None,
) -> dict[str, float]:
    """Fraction of queries whose correct gallery item ranks in the top k by cosine similarity.

    Query ``i``'s correct item is ``gallery[i]``. With ``groups`` (one int id per item, e.g. the
    same id for identical report texts) every gallery item of query ``i``'s group is correct, so
    retrieving a duplicate is not penalised. Exactly tied scores (within ``TIE_TOLERANCE``) are
    broken uniformly at random *in expectation*: a collapsed model that maps everything to one
    point scores chance, not 1.0. Returns ``{"R@1": ..., "R@5": ..., "R@10": ...}`` (fractions).
    """
    q, g = _paired_matrices(query, "query", gallery, "gallery")
    ks = _ks(ks)
    n = q.shape[0]
    grouping = np.arange(n) if groups is None else _int_vector(groups, "groups", n)
    return _recall(q, g, ks, [grouping])


def chance_recall_at_k(
    n: int, *, ks: Sequence[int] = (1, 5, 10), groups: np.ndarray | None = None
) -> dict[str, float]:
    """Expected recall@k of a uniformly random ranking of ``n`` items (same keys as recall_at_k).

    Without groups this is min(k, n) / n. With groups, query ``i`` has ``c_i`` correct items (its
    group's size) and is a hit unless all top-k draws (without replacement) are wrong:
    1 - C(n - c_i, k) / C(n, k) (hypergeometric), averaged over queries.
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise MetricInputError(f"n: expected a positive int, got {n!r}")
    ks = _ks(ks)
    if groups is None:
        sizes = np.ones(int(n))
    else:
        grouping = _int_vector(groups, "groups", int(n))
        _, inverse, counts = np.unique(grouping, return_inverse=True, return_counts=True)
        sizes = counts[inverse].astype(np.float64)
    wrong = n - sizes
    return {
        f"R@{k}": float(_prob_correct_in_top(np.full(int(n), float(k)), sizes, wrong).mean())
        for k in ks
    }


def cross_modal_retrieval(
    image_z: np.ndarray,
    text_z: np.ndarray,
    *,
    groups_image: np.ndarray | None = None,
    groups_text: np.ndarray | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Image->text and text->image recall@k for paired embeddings in one shared space.

    Row ``i`` of ``image_z`` is paired with row ``i`` of ``text_z``. Pair ``j`` counts as correct
    for pair ``i`` (in both directions) if its image is in the same ``groups_image`` group or its
    text is in the same ``groups_text`` group (duplicate images or duplicate reports).
    Keys: ``"i2t_R@k"`` (image queries, text gallery), ``"t2i_R@k"`` (text queries, image
    gallery) and ``"mean_R@k"`` (their average), for each k in ``ks``.
    """
    img, txt = _paired_matrices(image_z, "image_z", text_z, "text_z")
    ks = _ks(ks)
    groupings = _groupings(img.shape[0], groups_image, groups_text)
    i2t = _recall(img, txt, ks, groupings)
    t2i = _recall(txt, img, ks, groupings)
    result: dict[str, float] = {}
    for direction, values in (("i2t", i2t), ("t2i", t2i)):
        result.update({f"{direction}_{key}": value for key, value in values.items()})
    for k in ks:
        result[f"mean_R@{k}"] = (i2t[f"R@{k}"] + t2i[f"R@{k}"]) / 2.0
    return result


def cross_modal_hits(
    image_z: np.ndarray,
    text_z: np.ndarray,
    *,
    k: int,
    groups_image: np.ndarray | None = None,
    groups_text: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per pair: the image query's and the text query's expected hit at ``k`` (their means are
    ``cross_modal_retrieval``'s ``i2t_R@k`` and ``t2i_R@k``), for resampling the queries."""
    img, txt = _paired_matrices(image_z, "image_z", text_z, "text_z")
    ks = _ks((k,))
    groupings = _groupings(img.shape[0], groups_image, groups_text)
    return _query_hits(img, txt, ks, groupings)[0], _query_hits(txt, img, ks, groupings)[0]


def _groupings(
    n: int, groups_image: np.ndarray | None, groups_text: np.ndarray | None
) -> list[np.ndarray]:
    groupings = [np.arange(n)]
    if groups_image is not None:
        groupings.append(_int_vector(groups_image, "groups_image", n))
    if groups_text is not None:
        groupings.append(_int_vector(groups_text, "groups_text", n))
    return groupings
