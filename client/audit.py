"""Append-only egress audit log of a site: one JSON line for every reply that leaves the site.

Normal rounds send head arrays and scalar metrics; so do the closed-form start's query replies
(sums over the site's rows in the head's image linear path, server/closed_form.py). Under secure aggregation (SecAgg+, client/secagg.py)
a round is four replies carrying the protocol's payloads: public keys, encrypted key shares, the
masked (quantized, integer) head and Shamir shares of the masking secrets. Each is logged with its
stage, every field, its size and a digest; ``verify_audit_log`` accepts exactly those fields per stage.

Each line also records the head the coordinator sent in the message answered (names, shapes,
dtypes), so a log can be verified against it without the run's files. ``verify_audit_log`` checks
every reply against the head's exact arrays and the wire contract's metric names
(common/wire.py ``allowed_metrics``), and, given the coordinator's receipts (server/receipts.py),
that the coordinator received exactly what the site logged (same SHA-256, common/digest.py).
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import append_line
from common.digest import payload_digest, value_bytes
from common.wire import DECLINED_ERROR_CODE, allowed_metrics

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
# query: the closed-form start before round 1 (server/closed_form.py), arrays of the head's shape
MESSAGE_TYPES = ("train", "evaluate", "query")

HeadShapes = Mapping[str, tuple[int, ...]]  # the head's arrays, in order: name -> shape (float32)


def audit_path(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / AUDIT_FILE


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
    field["bytes"] = sum(len(value_bytes(v)) if isinstance(v, bytes | str) else 8 for v in items)
    return field


def _metric_value(value: Any) -> Any:
    """A metric as the log records it: a scalar as float, a list as floats, anything else as text."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, list | tuple):
        return [_metric_value(v) for v in value]
    return repr(value)[:200]


def record_egress(
    state_dir: str | os.PathLike[str],
    *,
    run_id: int,
    server_round: int,
    message_type: str,
    site: str,
    arrays: Mapping[str, np.ndarray],
    metrics: Mapping[str, Any],
    declined: bool = False,
    privacy: Mapping[str, Any] | None = None,
    protocol: tuple[str, Mapping[str, Any]] | None = None,
    timing: Mapping[str, float] | None = None,
    node_id: int | None = None,
    head: Sequence[Mapping[str, Any]] | None = None,
    extra: Mapping[str, str] | None = None,
    stage: str | None = None,
) -> dict[str, Any]:
    """Append what is about to leave the site to its audit log and return the entry.

    ``metrics``: as sent (a non-scalar value is logged as a list, and flagged by the verifier).
    ``timing``: local wall-clock times of this message's handling (they stay at the site).
    ``protocol``: (SecAgg+ stage, the reply's protocol fields as sent): bytes, lists of bytes or
    ints, npy-serialized masked arrays (``masked_params``), scalars; logged field by field.
    ``head``: the head the coordinator sent in the message answered (name, shape, dtype per array;
    common/digest.py ``sent_head``). ``extra``: any other record the reply carries, described.
    ``stage``: the SecAgg+ stage answered when there is no ``protocol`` (a declined stage).
    """
    fields = [_describe_field(k, v) for k, v in protocol[1].items()] if protocol else []
    protocol_bytes = sum(int(f["bytes"]) for f in fields)
    digest_fields = protocol[1] if protocol else (dict(extra) if extra else None)
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
        "sha256": payload_digest(arrays, digest_fields),
        "metrics": {k: _metric_value(v) for k, v in metrics.items()},
        "declined": bool(declined),
        "privacy": dict(privacy or {}),
    }
    if node_id is not None:
        entry["node_id"] = int(node_id)
    if (answered := protocol[0] if protocol else stage) is not None:
        entry["stage"] = answered
    if head is not None:
        entry["head"] = [
            {
                "name": str(a["name"]),
                "shape": [int(d) for d in a["shape"]],
                "dtype": str(a["dtype"]),
            }
            for a in head
        ]
    if extra:
        entry["extra_records"] = dict(extra)
    if timing:
        entry["timing"] = {k: float(v) for k, v in timing.items()}
    if protocol is not None:
        entry["secagg"] = {"protocol": SECAGG_PROTOCOL, "stage": protocol[0], "fields": fields}
    append_line(audit_path(state_dir), json.dumps(entry, sort_keys=True))
    return entry


@dataclass
class AuditSummary:
    """What an audit log says left the site, and whether all of it was allowed.

    ``unchecked``: lines whose arrays could not be checked (no head given for them, none recorded);
    each is also a violation. ``confirmed``: replies whose digest equals the coordinator's receipt;
    ``unconfirmed``: replies of a run with receipts that the coordinator has no receipt of (it never
    pulled them: they arrived after the round's deadline).
    """

    entries: int = 0
    runs: list[int] = field(default_factory=list)
    total_bytes: int = 0
    secagg_replies: int = 0  # SecAgg+ protocol replies (their bytes are in total_bytes too)
    secagg_bytes: int = 0
    declined: int = 0
    epsilon_spent: float | None = None
    violations: list[str] = field(default_factory=list)
    unchecked: list[int] = field(default_factory=list)
    confirmed: int = 0
    unconfirmed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


def verify_audit_log(
    path: str | os.PathLike[str],
    *,
    allowed_arrays: HeadShapes | None = None,
    run_ids: Collection[int] | None = None,
    receipts: Sequence[Mapping[str, Any]] | None = None,
) -> AuditSummary:
    """Check that only the head's arrays (exact names and shapes, float32), allowed finite scalar
    metrics and the SecAgg+ protocol's payloads (``SECAGG_PAYLOADS``; masked arrays shaped like the
    head) left, naming each violation by line, round and reply.

    ``allowed_arrays``: the head every reply of ``run_ids`` (all lines, if None) must carry; other
    lines are checked against the head recorded in them (the one the coordinator sent), and a line
    with arrays but no head to check them against is a violation (``unchecked``).
    ``receipts``: the coordinator's receipts (server/receipts.py) of the runs they cover: each of
    this site's replies must have the digest the coordinator recorded, and every reply the
    coordinator received from this site must be in the log.
    """
    summary = AuditSummary()
    runs: set[int] = set()
    entries: list[tuple[int, dict[str, Any]]] = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                summary.violations.append(f"line {line_no}: not valid JSON (truncated write?)")
                continue
            if not isinstance(entry, dict):
                summary.violations.append(f"line {line_no}: not a JSON object")
                continue
            summary.entries += 1
            try:
                _check_entry(entry, line_no, summary, allowed_arrays, run_ids)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                summary.violations.append(
                    f"line {line_no}: malformed entry ({type(exc).__name__}: {exc})"
                )
                continue
            entries.append((line_no, entry))
            runs.add(int(entry.get("run_id", -1)))
    summary.runs = sorted(runs)
    if receipts is not None:
        _cross_check(entries, receipts, summary)
    return summary


def _check_entry(
    entry: dict[str, Any],
    line_no: int,
    summary: AuditSummary,
    allowed_arrays: HeadShapes | None,
    run_ids: Collection[int] | None,
) -> None:
    """Count one line into ``summary`` and add its violations."""
    for key in ("run_id", "round", "node_id"):
        value = entry.get(key, -1)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} {value!r} is not an integer")
    run_id = int(entry.get("run_id", -1))
    total = int(entry.get("total_bytes", 0))
    summary.total_bytes += total
    summary.declined += int(bool(entry.get("declined")))
    if "secagg" in entry:
        summary.secagg_replies += 1
        summary.secagg_bytes += total
    epsilon = (entry.get("privacy") or {}).get("dp-epsilon")
    if epsilon is not None:
        summary.epsilon_spent = max(summary.epsilon_spent or 0.0, float(epsilon))
    given = allowed_arrays if run_ids is None or run_id in run_ids else None
    head, problems = _expected_head(entry, line_no, given)
    problems.extend(_entry_violations(entry, line_no, head))
    if head is None and _needs_head(entry):
        summary.unchecked.append(line_no)
        problems.append(
            f"{_where(entry, line_no)}: carries arrays, but no head to check them "
            "against (the line records none): give the run's head"
        )
    summary.violations.extend(problems)


def _where(entry: Mapping[str, Any], line_no: int) -> str:
    """``line N (run R, round K, train reply[, SecAgg+ stage S])``: where a violation is."""
    stage = (entry.get("secagg") or {}).get("stage")
    reply = f"{entry.get('message_type')} reply" + (f", SecAgg+ {stage}" if stage else "")
    return f"line {line_no} (run {entry.get('run_id')}, round {entry.get('round')}, {reply})"


def _expected_head(
    entry: Mapping[str, Any], line_no: int, given: HeadShapes | None
) -> tuple[HeadShapes | None, list[str]]:
    """The head this line's arrays must match: ``given``, else the one recorded in the line."""
    recorded = entry.get("head")
    recorded_shapes = (
        {str(a["name"]): tuple(int(d) for d in a["shape"]) for a in recorded}
        if isinstance(recorded, list)
        else None
    )
    problems = []
    if recorded is not None:
        for array in recorded:
            if array.get("dtype") != "float32":
                problems.append(
                    f"{_where(entry, line_no)}: the coordinator sent head array "
                    f"{array.get('name')} as {array.get('dtype')}, not float32"
                )
    if given is None:
        return recorded_shapes, problems
    if recorded_shapes is not None and dict(recorded_shapes) != {
        k: tuple(v) for k, v in given.items()
    }:
        problems.append(
            f"{_where(entry, line_no)}: the head the coordinator sent "
            f"({_shapes_text(recorded_shapes)}) is not the given head ({_shapes_text(given)})"
        )
    return given, problems


def _shapes_text(shapes: HeadShapes) -> str:
    return ", ".join(f"{k} {list(v)}" for k, v in shapes.items())


def _needs_head(entry: Mapping[str, Any]) -> bool:
    """Whether checking this line needs the head: a train or start-query reply with arrays or
    masked arrays."""
    if entry.get("message_type") not in ("train", "query") or entry.get("declined"):
        return False
    if "secagg" not in entry:
        return True
    return any(f.get("kind") == "masked-arrays" for f in entry["secagg"].get("fields", []))


def _entry_violations(entry: Mapping[str, Any], line_no: int, head: HeadShapes | None) -> list[str]:
    where = _where(entry, line_no)
    message_type = entry.get("message_type")
    if message_type not in MESSAGE_TYPES:
        return [f"{where}: unknown message type {message_type!r}"]
    problems = [
        f"{where}: carried {name} ({text}), which is not a record of the wire contract"
        for name, text in (entry.get("extra_records") or {}).items()
    ]
    arrays = list(entry.get("arrays") or [])
    secagg = "secagg" in entry
    if secagg:
        problems.extend(_secagg_violations(entry, line_no, head))
    elif entry.get("declined") and (arrays or entry.get("metrics")):
        problems.append(f"{where}: a declined round's line records a payload")
    elif message_type == "evaluate" and arrays:
        names = ", ".join(_array_text(a) for a in arrays)
        problems.append(f"{where}: an evaluate reply carried arrays ({names}); it may carry none")
    elif message_type in ("train", "query") and not entry.get("declined"):
        problems.extend(_array_violations(arrays, where, head))
    allowed = allowed_metrics(str(message_type), secagg=secagg)
    for name, value in (entry.get("metrics") or {}).items():
        if name not in allowed:
            problems.append(
                f"{where}: metric {name!r} is not an allowed {message_type}-reply metric "
                f"(allowed: {', '.join(sorted(allowed))})"
            )
        if isinstance(value, bool) or not isinstance(value, int | float):
            size = f"a list of {len(value)} values" if isinstance(value, list) else repr(value)
            problems.append(f"{where}: metric {name!r} is not a scalar ({size[:80]})")
        elif not math.isfinite(value):
            problems.append(f"{where}: metric {name!r} is not finite ({value})")
    return problems


def _array_text(array: Mapping[str, Any]) -> str:
    shape = "x".join(str(d) for d in array.get("shape", [])) or "scalar"
    return f"{array.get('name')} {shape} {array.get('dtype')}"


def _array_violations(
    arrays: list[Mapping[str, Any]], where: str, head: HeadShapes | None
) -> list[str]:
    """A train (or start-query) reply carries exactly the head's arrays: its names, its shapes,
    float32."""
    problems = []
    for array in arrays:
        name = str(array.get("name"))
        if head is not None and name not in head:
            problems.append(
                f"{where}: array {_array_text(array)} is not a head parameter "
                f"(the head has {', '.join(head)})"
            )
            continue
        if array.get("dtype") != "float32":
            problems.append(f"{where}: array {name} has dtype {array.get('dtype')}, want float32")
        if head is not None and tuple(array.get("shape", ())) != tuple(head[name]):
            problems.append(
                f"{where}: array {name} has shape {array.get('shape')}, the head has "
                f"{list(head[name])}"
            )
    if head is not None:
        missing = [name for name in head if name not in {a.get("name") for a in arrays}]
        if missing:
            problems.append(f"{where}: head array(s) {', '.join(missing)} missing from the reply")
    return problems


def _secagg_violations(
    entry: Mapping[str, Any], line_no: int, head: HeadShapes | None
) -> list[str]:
    """A SecAgg+ reply carries only its stage's protocol fields, and never unmasked arrays."""
    where = _where(entry, line_no)
    record = entry["secagg"]
    stage = record.get("stage")
    expected = SECAGG_PAYLOADS.get(stage)
    if record.get("protocol") != SECAGG_PROTOCOL or expected is None:
        return [f"{where}: unknown secure-aggregation stage {stage!r}"]
    problems = []
    if entry.get("arrays"):
        names = ", ".join(_array_text(a) for a in entry["arrays"])
        problems.append(f"{where}: a SecAgg+ {stage} reply carried unmasked arrays ({names})")
    for item in record.get("fields", []):
        name, kind = item.get("name"), item.get("kind")
        if expected.get(name) != kind:
            problems.append(
                f"{where}: SecAgg+ {stage} reply sent field {name} ({kind}), "
                "which is not a payload of that stage"
            )
        elif name == "status.code" and item.get("value") != 0:
            problems.append(f"{where}: SecAgg+ reply status code {item.get('value')}")
        elif name == "status.message" and item.get("value") != "Success":
            problems.append(f"{where}: SecAgg+ reply status message is not 'Success'")
        elif kind == "masked-arrays":
            problems.extend(_masked_violations(item["arrays"], where, head))
    return problems


def _masked_violations(
    arrays: list[Mapping[str, Any]], where: str, head: HeadShapes | None
) -> list[str]:
    """Masked arrays: the weight factor (shape [1]) then one integer array per head parameter
    (0-d parameters travel as shape [1]). Their shapes are compared as a multiset: a head file
    does not keep the head's order (safetensors sorts names)."""
    problems = [
        f"{where}: masked array {i} has dtype {a.get('dtype')}, want an integer dtype"
        for i, a in enumerate(arrays)
        if not str(a.get("dtype", "")).startswith(("int", "uint"))
    ]
    if head is not None:
        want = [[1]] + [list(shape) or [1] for shape in head.values()]
        got = [list(a.get("shape", [])) for a in arrays]
        if got[:1] != want[:1] or sorted(got[1:]) != sorted(want[1:]):
            problems.append(f"{where}: masked arrays have shapes {got}, the head gives {want}")
    return problems


def _receipt_key(record: Mapping[str, Any]) -> tuple[int, int, int, str, str | None]:
    stage = record.get("stage")
    return (
        int(record.get("run_id", -1)),
        int(record.get("node_id", -1)),
        int(record.get("round", -1)),
        str(record.get("message_type")),
        stage,
    )


def _cross_check(
    entries: list[tuple[int, dict[str, Any]]],
    receipts: Sequence[Mapping[str, Any]],
    summary: AuditSummary,
) -> None:
    """This site's replies against the coordinator's receipts of the runs the receipts cover."""
    valid = []
    for index, receipt in enumerate(receipts, start=1):
        try:
            _receipt_key(receipt)
        except (TypeError, ValueError) as exc:
            summary.violations.append(f"coordinator receipt {index}: malformed ({exc})")
            continue
        valid.append(receipt)
    receipts = valid
    covered = {int(r.get("run_id", -1)) for r in receipts}
    by_key: dict[tuple[int, int, int, str, str | None], list[Mapping[str, Any]]] = {}
    for receipt in receipts:
        by_key.setdefault(_receipt_key(receipt), []).append(receipt)
    nodes: set[tuple[int, int]] = set()
    names: set[str] = set()
    logged: set[tuple[int, int, int, str, str | None]] = set()
    for line_no, entry in entries:
        run_id = int(entry.get("run_id", -1))
        if run_id not in covered:
            continue
        if "node_id" not in entry:
            summary.violations.append(
                f"{_where(entry, line_no)}: the line records no node id, so it cannot be "
                "matched to the coordinator's receipts"
            )
            continue
        key = _receipt_key(entry)
        nodes.add((run_id, key[1]))
        names.add(str(entry.get("site")))
        logged.add(key)
        if entry.get("declined"):
            continue
        digests = [str(r["sha256"]) for r in by_key.get(key, []) if r.get("sha256")]
        undecodable = [str(r["undecodable"]) for r in by_key.get(key, []) if r.get("undecodable")]
        if entry.get("sha256") in digests:
            summary.confirmed += 1
        elif digests or undecodable:
            received = digests[0][:16] if digests else f"undecodable: {undecodable[0]}"
            logged_digest = str(entry.get("sha256"))[:16]
            summary.violations.append(
                f"{_where(entry, line_no)}: the site logged sha256 {logged_digest}..., the "
                f"coordinator received {received}...: the reply that arrived is not the one logged"
            )
        else:
            summary.unconfirmed.append(
                f"{_where(entry, line_no)}: no coordinator receipt (the reply was not pulled "
                "before the round's deadline)"
            )
    for receipt in receipts:
        run_id, node, server_round, message_type, stage = _receipt_key(receipt)
        ours = (run_id, node) in nodes or receipt.get("site") in names
        if not ours or _receipt_key(receipt) in logged:
            continue
        if receipt.get("error") is not None and receipt.get("error") != DECLINED_ERROR_CODE:
            continue  # an error reply carries only its reason: the site logs none
        summary.violations.append(
            f"the coordinator received a {message_type} reply"
            + (f" (SecAgg+ {stage})" if stage else "")
            + f" of run {run_id}, round {server_round} from this site (node {node}) that the "
            "audit log does not record"
        )
