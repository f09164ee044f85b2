"""Append-only egress audit log of a site: one JSON line for every reply that leaves the site."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import append_line

AUDIT_FILE = "audit.jsonl"


def audit_path(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / AUDIT_FILE


def payload_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the sent arrays (name, dtype, shape, bytes), in the order sent."""
    digest = hashlib.sha256()
    for name, value in arrays.items():
        array = np.array(value, order="C", copy=False)
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def record_egress(
    state_dir: str | os.PathLike[str],
    *,
    run_id: int,
    server_round: int,
    message_type: str,
    site: str,
    arrays: Mapping[str, np.ndarray],
    metrics: Mapping[str, float | int],
    declined: bool = False,
    privacy: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Append what is about to leave the site to its audit log and return the entry."""
    entry: dict[str, Any] = {
        "time": time.time(),
        "run_id": int(run_id),
        "round": int(server_round),
        "message_type": message_type,
        "site": site,
        "arrays": [
            {
                "name": name,
                "shape": list(np.shape(a)),
                "dtype": str(np.asarray(a).dtype),
                "bytes": int(np.asarray(a).nbytes),
            }
            for name, a in arrays.items()
        ],
        "total_bytes": int(sum(np.asarray(a).nbytes for a in arrays.values())),
        "sha256": payload_digest(arrays),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "declined": bool(declined),
        "privacy": dict(privacy or {}),
    }
    append_line(audit_path(state_dir), json.dumps(entry, sort_keys=True))
    return entry


@dataclass
class AuditSummary:
    """What an audit log says left the site, and whether all of it was allowed."""

    entries: int = 0
    runs: list[int] = field(default_factory=list)
    total_bytes: int = 0
    declined: int = 0
    epsilon_spent: float | None = None
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


def verify_audit_log(
    path: str | os.PathLike[str], *, allowed_arrays: Mapping[str, tuple[int, ...]] | None = None
) -> AuditSummary:
    """Check that only head arrays (float32, expected names/shapes when given) and scalars left."""
    summary = AuditSummary()
    runs: set[int] = set()
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                summary.violations.append(f"line {line_no}: not valid JSON (truncated write?)")
                continue
            summary.entries += 1
            runs.add(int(entry.get("run_id", -1)))
            summary.total_bytes += int(entry.get("total_bytes", 0))
            summary.declined += int(bool(entry.get("declined")))
            epsilon = entry.get("privacy", {}).get("dp-epsilon")
            if epsilon is not None:
                summary.epsilon_spent = max(summary.epsilon_spent or 0.0, float(epsilon))
            summary.violations.extend(_entry_violations(entry, line_no, allowed_arrays))
    summary.runs = sorted(runs)
    return summary


def _entry_violations(
    entry: Mapping[str, Any], line_no: int, allowed: Mapping[str, tuple[int, ...]] | None
) -> list[str]:
    problems = []
    if entry.get("message_type") == "evaluate" and entry.get("arrays"):
        problems.append(f"line {line_no}: an evaluate reply carried arrays")
    for array in entry.get("arrays", []):
        if array.get("dtype") != "float32":
            problems.append(
                f"line {line_no}: array {array.get('name')} has dtype {array.get('dtype')}"
            )
        if allowed is not None:
            expected = allowed.get(array.get("name", ""))
            if expected is None:
                problems.append(
                    f"line {line_no}: array {array.get('name')} is not a head parameter"
                )
            elif tuple(array.get("shape", ())) != tuple(expected):
                problems.append(
                    f"line {line_no}: array {array.get('name')} has shape {array.get('shape')}, head has {list(expected)}"
                )
    for name, value in entry.get("metrics", {}).items():
        if not isinstance(value, (int, float)):
            problems.append(f"line {line_no}: metric {name} is not a scalar")
    return problems
