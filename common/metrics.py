"""Evaluation metrics on embeddings: retrieval recall@k, zero-shot, probes, classifiers, alignment."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import gammaln
from sklearn.base import BaseEstimator
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier
from threadpoolctl import threadpool_limits

from common.errors import DataError

__all__ = [
    "CLASSIFIERS",
    "LinearAlignment",
    "MetricInputError",
    "chance_recall_at_k",
    "classifier_suite",
    "cross_modal_retrieval",
    "format_table",
    "linear_alignment",
    "linear_alignments",
    "linear_probe",
    "recall_at_k",
    "zero_shot",
]

TIE_TOLERANCE = 1e-6
"""Cosine scores closer than this to the best correct item's score count as ties (see recall_at_k)."""

PROBE_CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
"""Inverse regularisation strengths the linear probe chooses from by 3-fold cross-validation."""

_CHUNK_ELEMENTS = 1 << 24  # similarity-matrix entries held at once (128 MB of float64)


class MetricInputError(DataError, ValueError):
    """Invalid input to a metric (names the argument); both a DataError and a ValueError."""


# ----------------------------------------------------------------------------- validation


def _matrix(x: np.ndarray, name: str, *, min_rows: int = 1) -> np.ndarray:
    """Return ``x`` as a finite float64 [n, d] array, or raise naming ``name``."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise MetricInputError(f"{name}: expected a 2-D array [n, d], got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise MetricInputError(f"{name}: expected real numbers, got dtype {arr.dtype}")
    if arr.shape[0] < min_rows or arr.shape[1] < 1:
        raise MetricInputError(
            f"{name}: needs at least {min_rows} row(s) and 1 column, got shape {arr.shape}"
        )
    arr = arr.astype(np.float64, copy=False)
    bad = ~np.isfinite(arr)
    if bad.any():
        row = int(np.argwhere(bad)[0, 0])
        raise MetricInputError(
            f"{name}: contains {int(bad.sum())} NaN/inf value(s) (first in row {row})"
        )
    return arr


def _int_vector(y: np.ndarray, name: str, n: int) -> np.ndarray:
    """Return ``y`` as an int64 [n] array of integral values, or raise naming ``name``."""
    arr = np.asarray(y)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise MetricInputError(f"{name}: expected shape ({n},), got {arr.shape}")
    if np.issubdtype(arr.dtype, np.bool_) or np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.floating):
        raise MetricInputError(f"{name}: expected integer ids, got dtype {arr.dtype}")
    if not np.isfinite(arr).all():
        raise MetricInputError(f"{name}: contains NaN/inf")
    if not (arr == np.round(arr)).all():
        raise MetricInputError(f"{name}: expected integer ids, got non-integral values")
    return arr.astype(np.int64)


def _labels(y: np.ndarray, name: str, n: int) -> np.ndarray:
    """Class labels: integral and >= 0 (rows labelled -1 = unlabelled must be dropped first)."""
    arr = _int_vector(y, name, n)
    if (arr < 0).any():
        raise MetricInputError(
            f"{name}: contains negative label {int(arr.min())}; drop unlabelled (-1) rows first"
        )
    return arr


def _same_columns(a: np.ndarray, name_a: str, b: np.ndarray, name_b: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise MetricInputError(f"{name_b}: has {b.shape[1]} columns but {name_a} has {a.shape[1]}")


def _same_rows(a: np.ndarray, name_a: str, b: np.ndarray, name_b: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise MetricInputError(f"{name_b}: has {b.shape[0]} rows but {name_a} has {a.shape[0]}")


def _ks(ks: Sequence[int]) -> tuple[int, ...]:
    values = tuple(ks)
    if not values or any(
        isinstance(k, bool) or not isinstance(k, int | np.integer) for k in values
    ):
        raise MetricInputError(f"ks: expected a non-empty sequence of ints, got {ks!r}")
    if min(values) < 1:
        raise MetricInputError(f"ks: every k must be >= 1, got {values}")
    return tuple(int(k) for k in values)


# ----------------------------------------------------------------------------- retrieval


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm; an all-zero row stays zero (it then ties with everything)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


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


def _recall(
    query: np.ndarray, gallery: np.ndarray, ks: tuple[int, ...], groupings: Sequence[np.ndarray]
) -> dict[str, float]:
    """Expected recall@k under uniformly random tie-breaking, computed in query chunks."""
    q = _l2_normalize(query)
    g = _l2_normalize(gallery)
    n = q.shape[0]
    hits = np.zeros(len(ks))
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
            hits[index] += _prob_correct_in_top(k - above, tied_correct, tied_wrong).sum()
    return {f"R@{k}": float(hits[index] / n) for index, k in enumerate(ks)}


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
    q = _matrix(query, "query")
    g = _matrix(gallery, "gallery")
    _same_rows(q, "query", g, "gallery")
    _same_columns(q, "query", g, "gallery")
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
    img = _matrix(image_z, "image_z")
    txt = _matrix(text_z, "text_z")
    _same_rows(img, "image_z", txt, "text_z")
    _same_columns(img, "image_z", txt, "text_z")
    ks = _ks(ks)
    n = img.shape[0]
    groupings = [np.arange(n)]
    if groups_image is not None:
        groupings.append(_int_vector(groups_image, "groups_image", n))
    if groups_text is not None:
        groupings.append(_int_vector(groups_text, "groups_text", n))
    i2t = _recall(img, txt, ks, groupings)
    t2i = _recall(txt, img, ks, groupings)
    result: dict[str, float] = {}
    for direction, values in (("i2t", i2t), ("t2i", t2i)):
        result.update({f"{direction}_{key}": value for key, value in values.items()})
    for k in ks:
        result[f"mean_R@{k}"] = (i2t[f"R@{k}"] + t2i[f"R@{k}"]) / 2.0
    return result


# ----------------------------------------------------------------------------- zero-shot


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


# ----------------------------------------------------------------------------- classifiers


@dataclass(frozen=True)
class _Split:
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def _split(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray
) -> _Split:
    tx = _matrix(train_x, "train_x")
    ex = _matrix(test_x, "test_x")
    _same_columns(tx, "train_x", ex, "test_x")
    ty = _labels(train_y, "train_y", tx.shape[0])
    ey = _labels(test_y, "test_y", ex.shape[0])
    if np.unique(ty).size < 2:
        raise MetricInputError(f"train_y: needs at least 2 classes, got {np.unique(ty).tolist()}")
    return _Split(tx, ty, ex, ey)


def _min_class_count(y: np.ndarray) -> int:
    return int(np.bincount(y)[np.unique(y)].min())


def _scaled_logreg_cv(y: np.ndarray, seed: int) -> Pipeline | GridSearchCV:
    """StandardScaler + L2 LogisticRegression, C picked from PROBE_CS by stratified 3-fold CV.

    Folds shrink to the rarest class's count; with a class of one example C stays 1.0.
    """
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    folds = min(3, _min_class_count(y))
    if folds < 2:
        return pipeline
    return GridSearchCV(
        pipeline,
        {"logisticregression__C": list(PROBE_CS)},
        cv=StratifiedKFold(n_splits=folds),
        scoring="neg_log_loss",
        n_jobs=1,
    )


def _macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(f1_score(y_true, y_pred, average="macro", zero_division=0))


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    seed: int = 0,
) -> dict[str, float]:
    """Linear probe: scaled L2 logistic regression with C chosen by internal 3-fold CV.

    Returns ``probe_f1_macro`` (macro-F1 over the classes in the test labels and predictions,
    also for binary tasks), ``probe_acc`` and ``probe_C`` (the chosen inverse regularisation).
    Deterministic (lbfgs, unshuffled stratified folds). BLAS/OpenMP run single-threaded inside
    (see classifier_suite).
    """
    split = _split(train_x, train_y, test_x, test_y)
    model = _scaled_logreg_cv(split.train_y, seed)
    with threadpool_limits(limits=1):
        model.fit(split.train_x, split.train_y)
        predictions = model.predict(split.test_x)
    chosen = model.best_params_["logisticregression__C"] if isinstance(model, GridSearchCV) else 1.0
    return {
        "probe_f1_macro": _macro_f1(split.test_y, predictions),
        "probe_acc": float(accuracy_score(split.test_y, predictions)),
        "probe_C": float(chosen),
    }


def _knn(y: np.ndarray, seed: int) -> BaseEstimator:
    return KNeighborsClassifier(n_neighbors=min(5, y.shape[0]), metric="cosine", n_jobs=1)


def _tree(y: np.ndarray, seed: int) -> BaseEstimator:
    return DecisionTreeClassifier(random_state=seed)


def _forest(y: np.ndarray, seed: int) -> BaseEstimator:
    return RandomForestClassifier(n_estimators=100, n_jobs=2, random_state=seed)


def _gboost(y: np.ndarray, seed: int) -> BaseEstimator:
    return HistGradientBoostingClassifier(
        max_iter=30,
        learning_rate=0.2,
        max_leaf_nodes=15,
        max_bins=63,
        early_stopping=False,
        random_state=seed,
    )


def _logreg(y: np.ndarray, seed: int) -> BaseEstimator:
    return LogisticRegression(max_iter=1000, random_state=seed)


def _mlp(y: np.ndarray, seed: int) -> BaseEstimator:
    """Early stopping holds out a stratified 10%, which needs >= 2 examples of every class."""
    n_classes = np.unique(y).size
    early = _min_class_count(y) >= 2 and math.ceil(0.1 * y.shape[0]) >= n_classes
    return make_pipeline(
        StandardScaler(),
        MLPClassifier(
            hidden_layer_sizes=(256,), early_stopping=early, max_iter=200, random_state=seed
        ),
    )


CLASSIFIERS: Mapping[str, Callable[[np.ndarray, int], BaseEstimator]] = {
    "knn": _knn,
    "tree": _tree,
    "forest": _forest,
    "gboost": _gboost,
    "logreg": _logreg,
    "logreg_scaled": _scaled_logreg_cv,
    "mlp": _mlp,
}
"""classifier_suite's models, by name: factory(train_y, seed) -> unfitted sklearn estimator.

knn: 5 nearest neighbours, cosine. tree: DecisionTree. forest: RandomForest, 100 trees, 2 jobs.
gboost: HistGradientBoosting, 30 iterations (rate 0.2, 15 leaves, 63 bins). logreg: default LogisticRegression on raw
features (max_iter=1000), what a user would try first. logreg_scaled: the linear probe.
mlp: StandardScaler + one hidden layer of 256, early stopping.
"""


def classifier_suite(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    seed: int = 0,
    classifiers: list[str] | None = None,
) -> dict[str, float]:
    """Macro-F1 on the test set of each classifier in ``classifiers`` (default: all CLASSIFIERS).

    Macro-F1 (unweighted mean over the classes in the test labels and predictions) is used for
    every task, binary included. Keys are the classifier names. Each model is deterministic for
    a given ``seed``. Convergence warnings (unscaled logreg, MLP) are suppressed: a model that
    stops early is still what a user would get. BLAS and OpenMP are limited to one thread while
    fitting (the forest still uses 2 joblib workers): on a busy 2-core machine their spinning
    threads made small fits 5-30x slower, and results do not depend on thread counts.
    """
    names = list(CLASSIFIERS) if classifiers is None else list(classifiers)
    unknown = [name for name in names if name not in CLASSIFIERS]
    if unknown or not names:
        raise MetricInputError(
            f"classifiers: unknown or empty {unknown or names}; choose from {list(CLASSIFIERS)}"
        )
    split = _split(train_x, train_y, test_x, test_y)
    scores: dict[str, float] = {}
    for name in names:
        model = CLASSIFIERS[name](split.train_y, seed)
        with warnings.catch_warnings(), threadpool_limits(limits=1):
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(split.train_x, split.train_y)
            predictions = model.predict(split.test_x)
        scores[name] = _macro_f1(split.test_y, predictions)
    return scores


# ----------------------------------------------------------------------------- alignment


@dataclass(frozen=True)
class LinearAlignment:
    """A fitted linear map of two modalities into one shared space.

    ``transform_a(x) = (x - mean_a) @ proj_a`` and ``transform_b(x) = (x - mean_b) @ proj_b``.
    ``correlations`` holds the (ridge-regularised) canonical correlations for ``method="cca"``
    and is None for ``"lstsq"``.
    """

    method: str
    mean_a: np.ndarray
    mean_b: np.ndarray
    proj_a: np.ndarray
    proj_b: np.ndarray
    correlations: np.ndarray | None = None

    @property
    def dim(self) -> int:
        """Dimension of the shared space."""
        return int(self.proj_a.shape[1])

    def transform_a(self, x: np.ndarray) -> np.ndarray:
        """Map modality-a embeddings [n, da] into the shared space [n, dim] (float64)."""
        return _project(x, self.mean_a, self.proj_a)

    def transform_b(self, x: np.ndarray) -> np.ndarray:
        """Map modality-b embeddings [n, db] into the shared space [n, dim] (float64)."""
        return _project(x, self.mean_b, self.proj_b)


def _project(x: np.ndarray, mean: np.ndarray, proj: np.ndarray) -> np.ndarray:
    arr = _matrix(x, "x")
    if arr.shape[1] != mean.shape[0]:
        raise MetricInputError(
            f"x: has {arr.shape[1]} columns, the alignment expects {mean.shape[0]}"
        )
    return (arr - mean) @ proj


@dataclass(frozen=True)
class _Spectrum:
    """Eigendecomposition of a centred matrix's covariance, to add any ridge cheaply."""

    values: np.ndarray
    vectors: np.ndarray
    scale: float

    @classmethod
    def of(cls, x: np.ndarray, name: str) -> _Spectrum:
        cov = x.T @ x / max(x.shape[0] - 1, 1)
        scale = float(np.trace(cov)) / cov.shape[0]
        if scale <= 0.0:
            raise MetricInputError(f"{name}: has zero variance (all rows identical)")
        values, vectors = np.linalg.eigh(cov)
        return cls(np.clip(values, 0.0, None), vectors, scale)

    def power(self, ridge: float, exponent: float) -> np.ndarray:
        """(covariance + ``ridge`` x mean variance x I) ** ``exponent``."""
        shifted = (self.values + ridge * self.scale) ** exponent
        return (self.vectors * shifted) @ self.vectors.T


RIDGES = (1e-3, 1e-2, 1e-1, 0.3, 1.0, 3.0, 10.0)
"""Relative ridges a frozen baseline's alignment is tuned over (see ``select_ridge``)."""


def select_ridge(
    train_a: np.ndarray,
    train_b: np.ndarray,
    *,
    method: str = "lstsq",
    groups: np.ndarray | None = None,
    ridges: Sequence[float] = RIDGES,
    folds: int = 3,
    seed: int = 0,
) -> float:
    """The ridge of ``linear_alignment`` that retrieves best on held-out folds of the training pairs.

    Each fold is fitted on the other folds and scored by mean recall@5 (both directions;
    ``groups`` marks duplicate texts as in ``cross_modal_retrieval``); the ridge with the best
    mean score wins (the smaller on ties). The test split is never seen, so a frozen baseline is
    tuned as fairly as a trained head is.
    """
    a = _matrix(train_a, "train_a", min_rows=2 * folds)
    b = _matrix(train_b, "train_b", min_rows=2 * folds)
    _same_rows(a, "train_a", b, "train_b")
    if folds < 2 or not ridges:
        raise MetricInputError("select_ridge: needs folds >= 2 and at least one ridge")
    order = np.random.default_rng(seed).permutation(a.shape[0])
    parts = np.array_split(order, folds)
    scores = np.zeros((folds, len(ridges)))
    for k, held in enumerate(parts):
        fit = np.concatenate([p for j, p in enumerate(parts) if j != k])
        alignments = linear_alignments(a[fit], b[fit], method=method, ridges=ridges)
        for r, alignment in enumerate(alignments):
            recall = cross_modal_retrieval(
                alignment.transform_a(a[held]),
                alignment.transform_b(b[held]),
                groups_text=None if groups is None else np.asarray(groups)[held],
                ks=(5,),
            )
            scores[k, r] = recall["mean_R@5"]
    return float(ridges[int(np.argmax(scores.mean(axis=0)))])


def linear_alignment(
    train_a: np.ndarray,
    train_b: np.ndarray,
    *,
    method: str = "lstsq",
    dim: int | None = None,
    ridge: float = 1e-3,
) -> LinearAlignment:
    """Fit the cheapest shared space for paired frozen embeddings: a baseline for the heads.

    ``method="lstsq"``: ridge least squares from a to b (both centred with training means); the
    shared space is b's space, b's side is the identity. ``dim`` must be None.
    ``method="cca"``: closed-form CCA: whiten each side with its ridge-regularised covariance,
    SVD of the whitened cross-covariance, keep the top ``dim`` canonical directions
    (default min(da, db, n - 1)).
    ``ridge`` is relative: the penalty added to each covariance's diagonal is ``ridge`` times its
    mean variance, so it does not depend on the embeddings' scale.
    """
    return linear_alignments(train_a, train_b, method=method, dim=dim, ridges=(ridge,))[0]


def linear_alignments(
    train_a: np.ndarray,
    train_b: np.ndarray,
    *,
    ridges: Sequence[float],
    method: str = "lstsq",
    dim: int | None = None,
) -> list[LinearAlignment]:
    """``linear_alignment`` for each of ``ridges`` (in order), sharing one eigendecomposition of
    each side's covariance: tuning a ridge costs one fit, not one per ridge."""
    a = _matrix(train_a, "train_a", min_rows=2)
    b = _matrix(train_b, "train_b", min_rows=2)
    _same_rows(a, "train_a", b, "train_b")
    for ridge in ridges:
        if not (isinstance(ridge, int | float) and math.isfinite(ridge) and ridge > 0):
            raise MetricInputError(f"ridge: expected a finite number > 0, got {ridge!r}")
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    a_c, b_c = a - mean_a, b - mean_b
    cross = a_c.T @ b_c / (a.shape[0] - 1)
    if method == "lstsq":
        if dim is not None:
            raise MetricInputError("dim: only used with method='cca'; leave it None for 'lstsq'")
        spectrum_a = _Spectrum.of(a_c, "train_a")
        identity = np.eye(b.shape[1])
        return [
            LinearAlignment("lstsq", mean_a, mean_b, spectrum_a.power(r, -1.0) @ cross, identity)
            for r in ridges
        ]
    if method == "cca":
        limit = min(a.shape[1], b.shape[1], a.shape[0] - 1)
        k = limit if dim is None else dim
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= limit:
            raise MetricInputError(f"dim: expected an int in [1, {limit}], got {dim!r}")
        spectrum_a, spectrum_b = _Spectrum.of(a_c, "train_a"), _Spectrum.of(b_c, "train_b")
        alignments = []
        for r in ridges:
            white_a, white_b = spectrum_a.power(r, -0.5), spectrum_b.power(r, -0.5)
            u, s, vt = np.linalg.svd(white_a @ cross @ white_b, full_matrices=False)
            alignments.append(
                LinearAlignment(
                    "cca",
                    mean_a,
                    mean_b,
                    white_a @ u[:, :k],
                    white_b @ vt[:k].T,
                    correlations=s[:k],
                )
            )
        return alignments
    raise MetricInputError(f"method: expected 'lstsq' or 'cca', got {method!r}")


# ----------------------------------------------------------------------------- tables


def _cell(value: object, digits: int) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float | np.floating):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def format_table(rows: list[dict[str, Any]], columns: list[str], *, digits: int = 4) -> str:
    """A GitHub-markdown table of ``rows`` restricted to ``columns`` (in that order).

    Floats get ``digits`` decimals, missing keys and None become empty cells, ``|`` in text is
    escaped. Columns whose values are all numbers are right-aligned. Cells are padded so the
    table also reads well as plain text. No trailing newline.
    """
    if not columns:
        raise MetricInputError("columns: expected at least one column name")
    cells = [[_cell(row.get(column), digits) for column in columns] for row in rows]
    numeric = [
        all(_is_number(row[column]) for row in rows if row.get(column) is not None)
        and any(row.get(column) is not None for row in rows)
        for column in columns
    ]
    header = [_cell(column, digits) for column in columns]
    widths = [
        max([3, len(header[i])] + [len(line[i]) for line in cells]) for i in range(len(columns))
    ]

    def render(values: list[str]) -> str:
        padded = [
            value.rjust(width) if right else value.ljust(width)
            for value, width, right in zip(values, widths, numeric, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = [
        ("-" * (width - 1) + ":") if right else "-" * width
        for width, right in zip(widths, numeric, strict=True)
    ]
    lines = [render(header), "| " + " | ".join(rule) + " |"]
    lines.extend(render(line) for line in cells)
    return "\n".join(lines)
