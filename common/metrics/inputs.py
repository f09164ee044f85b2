"""Input checks shared by every metric (they raise MetricInputError naming the argument)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from common.errors import DataError


class MetricInputError(DataError, ValueError):
    """Invalid input to a metric (names the argument); both a DataError and a ValueError."""


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


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm; an all-zero row stays zero (it then ties with everything)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)
