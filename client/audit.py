"""Append-only egress audit log of a site: one JSON line for every reply that leaves the site.

Normal rounds send head arrays and scalar metrics. Under secure aggregation (SecAgg+, client/secagg.py)
a round is four replies carrying the protocol's payloads: public keys, encrypted key shares, the
masked (quantized, integer) head and Shamir shares of the masking secrets. Each is logged with its
stage, every field, its size and a digest; ``verify_audit_log`` accepts exactly those fields per stage.
"""

from __future__ import annotations

import hashlib
import io
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
SECAGG_PROTOCOL = "secagg+"
# What a SecAgg+ reply may carry, by stage: field -> kind (Flower 1.41's secaggplus_mod keys).
SECAGG_PAYLOADS: dict[str, dict[str, str]] = {
    "setup": {"pk1": "bytes", "pk2": "bytes"},
    "share_keys": {"dsts": "int-list", "ctxts": "bytes-list"},
    "collect_masked_vectors": {
        "masked_params": "masked-arrays",
        "status.code": "int",
        "status.message": "str",
    },
    "unmask": {"nids": "int-list", "shares": "bytes-list"},
}
MASKED_FIELD = "masked_params"


def audit_path(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / AUDIT_FILE


def payload_digest(
    arrays: Mapping[str, np.ndarray], protocol_fields: Mapping[str, Any] | None = None
) -> str:
    """SHA-256 over the sent arrays (name, dtype, shape, bytes), in the order sent, then over the
    protocol fields (name, then each value's bytes; ints as 16-byte little-endian)."""
    digest = hashlib.sha256()
    for name, value in arrays.items():
        array = np.asarray(value)
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    for name, value in (protocol_fields or {}).items():
        digest.update(f"{name}|".encode())
        for item in value if isinstance(value, list) else [value]:
            digest.update(_as_bytes(item))
    return digest.hexdigest()


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bool | int):  # node ids are unsigned 64-bit
        return int(value).to_bytes(16, "little", signed=True)
    return np.asarray(value, dtype=np.float64).tobytes()


def _describe_field(name: str, value: Any) -> dict[str, Any]:
    """What one protocol field carries: its kind, item count and bytes (masked arrays: shapes, dtypes)."""
    items = value if isinstance(value, list) else [value]
    field: dict[str, Any] = {"name": name, "count": len(items)}
    if name == MASKED_FIELD and all(isinstance(v, bytes) for v in items):
        masked = [np.load(io.BytesIO(v), allow_pickle=False) for v in items]
        field["kind"] = "masked-arrays"
        field["arrays"] = [{"shape": list(a.shape), "dtype": str(a.dtype)} for a in masked]
    elif isinstance(value, bytes):
        field["kind"] = "bytes"
    elif isinstance(value, list) and all(isinstance(v, bytes) for v in items):
        field["kind"] = "bytes-list"
    elif isinstance(value, list) and all(type(v) is int for v in items):
        field["kind"] = "int-list"
    elif type(value) in (int, float, str):
        field["kind"] = type(value).__name__
        field["value"] = value
    else:
        field["kind"] = f"other:{type(value).__name__}"
    field["bytes"] = sum(len(_as_bytes(v)) if isinstance(v, bytes | str) else 8 for v in items)
    return field


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
    protocol: tuple[str, Mapping[str, Any]] | None = None,
    timing: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Append what is about to leave the site to its audit log and return the entry.

    ``timing``: local wall-clock times of this message's handling (they stay at the site).

    ``protocol``: (SecAgg+ stage, the reply's protocol fields as sent): bytes, lists of bytes or
    ints, npy-serialized masked arrays (``masked_params``), scalars; logged field by field.
    """
    fields = [_describe_field(k, v) for k, v in protocol[1].items()] if protocol else []
    protocol_bytes = sum(int(f["bytes"]) for f in fields)
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
        "total_bytes": int(sum(np.asarray(a).nbytes for a in arrays.values())) + protocol_bytes,
        "sha256": payload_digest(arrays, protocol[1] if protocol else None),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "declined": bool(declined),
        "privacy": dict(privacy or {}),
    }
    if timing:
        entry["timing"] = {k: float(v) for k, v in timing.items()}
    if protocol is not None:
        entry["secagg"] = {"protocol": SECAGG_PROTOCOL, "stage": protocol[0], "fields": fields}
    append_line(audit_path(state_dir), json.dumps(entry, sort_keys=True))
    return entry


@dataclass
class AuditSummary:
    """What an audit log says left the site, and whether all of it was allowed."""

    entries: int = 0
    runs: list[int] = field(default_factory=list)
    total_bytes: int = 0
    secagg_replies: int = 0  # SecAgg+ protocol replies (their bytes are in total_bytes too)
    secagg_bytes: int = 0
    declined: int = 0
    epsilon_spent: float | None = None
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


def verify_audit_log(
    path: str | os.PathLike[str], *, allowed_arrays: Mapping[str, tuple[int, ...]] | None = None
) -> AuditSummary:
    """Check that only head arrays (float32, expected names/shapes when given), scalars and the
    SecAgg+ protocol's payloads (``SECAGG_PAYLOADS``; masked arrays shaped like the head) left."""
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
            if "secagg" in entry:
                summary.secagg_replies += 1
                summary.secagg_bytes += int(entry.get("total_bytes", 0))
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
    if "secagg" in entry:
        problems.extend(_secagg_violations(entry, line_no, allowed))
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


def _secagg_violations(
    entry: Mapping[str, Any], line_no: int, allowed: Mapping[str, tuple[int, ...]] | None
) -> list[str]:
    """A SecAgg+ reply carries only its stage's protocol fields, and never unmasked arrays."""
    record = entry["secagg"]
    stage = record.get("stage")
    expected = SECAGG_PAYLOADS.get(stage)
    if record.get("protocol") != SECAGG_PROTOCOL or expected is None:
        return [f"line {line_no}: unknown secure-aggregation stage {stage!r}"]
    problems = []
    if entry.get("arrays"):
        problems.append(f"line {line_no}: a SecAgg+ {stage} reply carried unmasked arrays")
    for item in record.get("fields", []):
        name, kind = item.get("name"), item.get("kind")
        if expected.get(name) != kind:
            problems.append(
                f"line {line_no}: SecAgg+ {stage} reply sent field {name} ({kind}), "
                "which is not a payload of that stage"
            )
        elif name == "status.code" and item.get("value") != 0:
            problems.append(f"line {line_no}: SecAgg+ reply status code {item.get('value')}")
        elif name == "status.message" and item.get("value") != "Success":
            problems.append(f"line {line_no}: SecAgg+ reply status message is not 'Success'")
        elif kind == "masked-arrays":
            problems.extend(_masked_violations(item["arrays"], line_no, allowed))
    return problems


def _masked_violations(
    arrays: list[Mapping[str, Any]], line_no: int, allowed: Mapping[str, tuple[int, ...]] | None
) -> list[str]:
    """Masked arrays: the weight factor (shape [1]) then one integer array per head parameter
    (0-d parameters travel as shape [1]), in the head's order."""
    problems = [
        f"line {line_no}: masked array {i} has dtype {a.get('dtype')}, want an integer dtype"
        for i, a in enumerate(arrays)
        if not str(a.get("dtype", "")).startswith(("int", "uint"))
    ]
    if allowed is not None:
        want = [[1]] + [list(shape) or [1] for shape in allowed.values()]
        got = [list(a.get("shape", [])) for a in arrays]
        if got != want:
            problems.append(
                f"line {line_no}: masked arrays have shapes {got}, the head gives {want}"
            )
    return problems
