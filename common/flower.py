"""Conversions between head state (numpy arrays by name) and Flower records, used by both sides."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord


def record_from_arrays(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord holding exactly ``arrays`` (names and order kept)."""
    record = ArrayRecord()
    for name, value in arrays.items():
        record[name] = Array(np.array(value, order="C", copy=True))
    return record


def arrays_from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The named numpy arrays inside an ArrayRecord."""
    return {name: array.numpy() for name, array in record.items()}


def record_nbytes(record: ArrayRecord) -> int:
    """Serialized bytes of the arrays in ``record`` (array data with its npy header, without gRPC framing)."""
    return int(sum(len(array.data) for array in record.values()))


def metric_record(metrics: Mapping[str, float | int]) -> MetricRecord:
    """A MetricRecord of scalar metrics."""
    values: dict[str, int | float | list[int] | list[float]] = dict(metrics)
    return MetricRecord(values)
