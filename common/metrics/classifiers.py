"""Classifiers fitted on embeddings: the linear probe and the classifier suite (macro-F1)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sklearn.base import BaseEstimator
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import Pipeline

# scikit-learn is imported where a model is built (about 1 s of CPU): every site and coordinator
# process imports this package for retrieval and zero-shot metrics, few of them fit a classifier.

from common.metrics.inputs import (
    MetricInputError,
    _labels,
    _matrix,
    _same_columns,
)

PROBE_CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
"""Inverse regularisation strengths the linear probe chooses from by 3-fold cross-validation."""


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
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

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
    from sklearn.metrics import f1_score

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
    from sklearn.metrics import accuracy_score
    from sklearn.model_selection import GridSearchCV
    from threadpoolctl import threadpool_limits

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
    from sklearn.neighbors import KNeighborsClassifier

    return KNeighborsClassifier(n_neighbors=min(5, y.shape[0]), metric="cosine", n_jobs=1)


def _tree(y: np.ndarray, seed: int) -> BaseEstimator:
    from sklearn.tree import DecisionTreeClassifier

    return DecisionTreeClassifier(random_state=seed)


def _forest(y: np.ndarray, seed: int) -> BaseEstimator:
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(n_estimators=100, n_jobs=2, random_state=seed)


def _gboost(y: np.ndarray, seed: int) -> BaseEstimator:
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(
        max_iter=30,
        learning_rate=0.2,
        max_leaf_nodes=15,
        max_bins=63,
        early_stopping=False,
        random_state=seed,
    )


def _logreg(y: np.ndarray, seed: int) -> BaseEstimator:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=1000, random_state=seed)


def _mlp(y: np.ndarray, seed: int) -> BaseEstimator:
    """Early stopping holds out a stratified 10%, which needs >= 2 examples of every class."""
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

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
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

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
