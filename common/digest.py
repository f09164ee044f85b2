"""What a site's reply carries, and its SHA-256, computed the same way at both ends.

The site splits every reply it sends into arrays, metrics and (SecAgg+) protocol fields before it
leaves (client/egress.py writes them to the site's audit log); the coordinator splits every reply it
receives the same way and records the digest (server/receipts.py). ``fedembed audit --run``
compares the two: equal digests show the coordinator received exactly what the site logged.
Both sides import this module; nothing else computes the digest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from common.wire import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    HEAD_KEYS,
    HEAD_SHAPES,
    METRICS_RECORD,
    ROUND_OFFSET,
    SERVER_ROUND,
    SITE_RECORD,
    absolute_round,
)

SECAGG_FIT_CONFIG = "fitins.config"  # Flower's legacy FitIns config record (the SecAgg+ fit stage)


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
            digest.update(value_bytes(item))
    return digest.hexdigest()


def value_bytes(value: Any) -> bytes:
    """A protocol field value's bytes as the digest covers them."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bool | int):  # node ids are unsigned 64-bit
        return int(value).to_bytes(16, "little", signed=True)
    return np.asarray(value, dtype=np.float64).tobytes()


@dataclass
class ReplyPayload:
    """Everything a reply carries, split as the audit log records it.

    ``arrays``: the head arrays by name (arrays of any other record as ``<record>/<name>``);
    ``metrics``: metric values as sent (scalars or lists; other records' as ``<record>/<name>``);
    ``fields``: SecAgg+ protocol fields (None for a normal reply); ``extra``: anything else a
    normal reply carries (another config record), described. The site's name record is not
    part of it (the audit line and the coordinator's receipt carry the name).
    """

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    fields: dict[str, Any] | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        protocol = self.fields if self.fields is not None else (self.extra or None)
        return payload_digest(self.arrays, protocol)


def reply_payload(content: RecordDict, *, secagg: bool) -> ReplyPayload:
    """Split a reply's content (records in name order: their order may change in transit)."""
    if secagg:
        return _secagg_payload(content)
    payload = ReplyPayload()
    for name, record in sorted(content.array_records.items()):
        prefix = "" if name == ARRAYS_RECORD else f"{name}/"
        payload.arrays.update({prefix + k: a.numpy() for k, a in record.items()})
    for name, metrics in sorted(content.metric_records.items()):
        prefix = "" if name == METRICS_RECORD else f"{name}/"
        payload.metrics.update({prefix + k: v for k, v in metrics.items()})
    for name, config in sorted(content.config_records.items()):
        if name != SITE_RECORD:
            payload.extra[f"record:{name}"] = _describe(config)
    return payload


def _secagg_payload(content: RecordDict) -> ReplyPayload:
    """A SecAgg+ reply: protocol fields, scalar metrics (sent in the clear), any unmasked arrays."""
    payload = ReplyPayload(fields={})
    fields: dict[str, Any] = {}
    for name, config in sorted(content.config_records.items()):
        if name == RECORD_KEY_CONFIGS:
            fields.update(dict(config))
        elif name == "fitres.status":
            fields.update({f"status.{k}": v for k, v in config.items()})
        elif name == "fitres.metrics":
            for key, value in config.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    payload.metrics[key] = value
                else:
                    fields[f"metric:{key}"] = value
        else:
            fields[f"record:{name}"] = _describe(config)
    for name, record in sorted(content.metric_records.items()):
        if name == "fitres.num_examples":  # the site's SecAgg+ weight, sent in the clear
            payload.metrics.update(dict(record))
        else:
            fields[f"record:{name}"] = _describe(record)
    for name, array_record in sorted(content.array_records.items()):
        payload.arrays.update({f"{name}/{k}": a.numpy() for k, a in array_record.items()})
    payload.fields = fields
    return payload


def _describe(record: Mapping[str, Any]) -> str:
    return json.dumps({k: repr(v)[:200] for k, v in record.items()}, sort_keys=True)


def secagg_stage(msg: Message) -> str | None:
    """The SecAgg+ stage ``msg`` asks for; None when it is not a SecAgg+ message."""
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    return None if configs is None else str(configs.get(Key.STAGE, ""))


def message_round(msg: Message, *, stage: str | None) -> int:
    """The run's round a server message belongs to (SecAgg+: its group id; else from its config)."""
    if stage is not None:
        return int(msg.metadata.group_id or 0)
    config: dict[str, Any] = dict(msg.content.config_records.get(CONFIG_RECORD) or {})
    return absolute_round(config.get(SERVER_ROUND, 0), config.get(ROUND_OFFSET, 0))


def sent_head(msg: Message, *, stage: str | None) -> list[dict[str, Any]] | None:
    """The head a server message carries: each array's name, shape and dtype, in order.

    A normal message carries it in its ``arrays`` record; a SecAgg+ fit stage names it in its
    config (``head-keys``, ``head-shapes``; float32). None when the message carries no head.
    """
    if stage is None:
        record = msg.content.array_records.get(ARRAYS_RECORD)
        if record is None:
            return None
        return [
            {"name": name, "shape": [int(d) for d in a.shape], "dtype": str(a.dtype)}
            for name, a in record.items()
        ]
    config = msg.content.config_records.get(SECAGG_FIT_CONFIG)
    if config is None or HEAD_KEYS not in config or HEAD_SHAPES not in config:
        return None
    names = json.loads(str(config[HEAD_KEYS]))
    shapes = json.loads(str(config[HEAD_SHAPES]))
    return [{"name": n, "shape": list(shapes[n]), "dtype": "float32"} for n in names]
