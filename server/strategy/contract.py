"""The server's contract for a site's reply: what a valid update is, and how an error reply is classified."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Message, MetricRecord, RecordDict

from common.flower import arrays_from_record
from common.wire import (
    ARRAYS_RECORD,
    DECLINED_ERROR_CODE,
    METRICS_RECORD,
    NODE_UNAVAILABLE_CODE,
    NUM_EXAMPLES,
    SITE_ERROR_PREFIX,
    SITE_NAME,
    SITE_NAME_KEY,
    SITE_RECORD,
)

SUPERLINK_NODE_ID = 1  # replies Flower makes up for an unreachable node come from the SuperLink
MAX_METRICS = 64  # scalar metrics a reply may carry
NPY_HEADER_SLACK = 4096  # bytes an array's serialized form may exceed its raw data by
MAX_REASON = 300  # characters of a site's error text kept in history and logs


def site_name(reply: Message) -> str | None:
    """The name the site gave in this reply (record or error prefix), if well formed."""
    if reply.has_error():
        found = SITE_ERROR_PREFIX.match(str(reply.error.reason))
        return found.group(1) if found else None
    if SITE_RECORD not in reply.content.config_records:
        return None
    record = reply.content.config_records[SITE_RECORD]
    name = record.get(SITE_NAME_KEY) if set(record) == {SITE_NAME_KEY} else None
    return name if isinstance(name, str) and SITE_NAME.fullmatch(name) else None


def short_reason(text: str) -> str:
    """A site's error text without its ``[site NAME]`` prefix, on one line, at most MAX_REASON long."""
    text = SITE_ERROR_PREFIX.sub("", str(text), count=1).replace("\n", " ")
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def classify_error(reply: Message) -> tuple[str, str]:
    """An error reply's outcome (declined, dropped or failed) and its reason, shortened."""
    code, reason = int(reply.error.code), short_reason(str(reply.error.reason))
    if code == DECLINED_ERROR_CODE:
        return "declined", reason
    if code == NODE_UNAVAILABLE_CODE or reply.metadata.src_node_id == SUPERLINK_NODE_ID:
        return "dropped", f"node unavailable: {reason}"
    return "failed", reason


@dataclass
class UpdateCheck:
    """The server's contract for a site's update: the head's exact keys, shapes, float32, finite, bounded."""

    shapes: dict[str, tuple[int, ...]]
    max_update_norm: float

    def problems(self, reply: Message, global_arrays: Mapping[str, np.ndarray] | None) -> list[str]:
        """Why this reply must not be aggregated (empty when it is valid).

        Sizes, shapes and dtypes are checked on the arrays' descriptions before any is decoded,
        so an oversized or malformed payload costs no more than its transfer.
        """
        if reply.has_error():
            return [f"site error: {short_reason(str(reply.error.reason))}"]
        try:
            return self._problems(reply.content, global_arrays)
        except Exception as exc:  # a malformed payload must never take the coordinator down
            return [f"undecodable update: {type(exc).__name__}: {short_reason(str(exc))}"]

    def _problems(
        self, content: RecordDict, global_arrays: Mapping[str, np.ndarray] | None
    ) -> list[str]:
        if set(content.array_records) != {ARRAYS_RECORD} or set(content.metric_records) != {
            METRICS_RECORD
        }:
            return [
                f"unexpected records {sorted(content.keys())[:5]} (want 'arrays' and 'metrics')"
            ]
        if set(content.config_records) - {SITE_RECORD}:
            return [f"unexpected config records {sorted(content.config_records)[:5]}"]
        if SITE_RECORD in content.config_records:
            site = content.config_records[SITE_RECORD]
            name = site.get(SITE_NAME_KEY) if set(site) == {SITE_NAME_KEY} else None
            if not (isinstance(name, str) and SITE_NAME.fullmatch(name)):
                return [f"the '{SITE_RECORD}' record must be exactly {{'name': <site name>}}"]
        record = content.array_records[ARRAYS_RECORD]
        if set(record) != set(self.shapes):
            missing = sorted(set(self.shapes) - set(record))
            extra = sorted(set(record) - set(self.shapes))
            return [f"head keys differ (missing {missing[:3]}, unexpected {extra[:3]})"]
        if list(record) != list(self.shapes):  # Flower's DP clipping pairs arrays by position
            return ["head keys are in another order than the global head's"]
        issues = [issue for name in self.shapes if (issue := self._describe(name, record[name]))]
        if issues:
            return issues
        arrays = arrays_from_record(record)
        for name, value in arrays.items():
            if value.dtype != np.float32 or tuple(value.shape) != self.shapes[name]:
                issues.append(f"{name}: payload holds {value.dtype} {tuple(value.shape)}")
            elif not np.isfinite(value).all():
                issues.append(f"{name}: NaN or inf values")
        if issues:
            return issues
        metric_issue = metric_problem(content.metric_records[METRICS_RECORD])
        if metric_issue:
            return [metric_issue]
        if global_arrays is not None:
            norm = float(
                np.sqrt(sum(float(((arrays[k] - global_arrays[k]) ** 2).sum()) for k in arrays))
            )
            if norm > self.max_update_norm:
                return [f"update norm {norm:.3g} exceeds the bound {self.max_update_norm:.3g}"]
        return []

    def _describe(self, name: str, array: Any) -> str | None:
        """What is wrong with one array's declared dtype, shape and size (None if nothing)."""
        shape = tuple(int(d) for d in array.shape)
        if str(array.dtype) != "float32":
            return f"{name}: dtype {array.dtype}, want float32"
        if shape != self.shapes[name]:
            return f"{name}: shape {shape}, want {self.shapes[name]}"
        limit = 4 * math.prod(self.shapes[name]) + NPY_HEADER_SLACK
        if len(array.data) > limit:
            return f"{name}: {len(array.data)} bytes for a {shape} float32 array"
        return None


def metric_problem(metrics: MetricRecord) -> str | None:
    """Why a reply's metrics are unusable: too many, not finite scalars, or no positive num-examples."""
    if len(metrics) > MAX_METRICS:
        return f"{len(metrics)} metrics (at most {MAX_METRICS})"
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"metric '{key[:40]}' is not a scalar"
        if not math.isfinite(value):
            return f"metric '{key[:40]}' is not finite"
    examples = metrics.get(NUM_EXAMPLES)
    if not isinstance(examples, (int, float)) or not examples > 0:
        return f"{NUM_EXAMPLES} is {examples!r}, want a positive number"
    return None
