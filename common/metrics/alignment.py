"""Closed-form linear alignment (ridge least squares or CCA) of two frozen embedding spaces."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.metrics.inputs import (
    MetricInputError,
    _matrix,
    _same_rows,
)
from common.metrics.retrieval import cross_modal_retrieval


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
