"""What leaves the site: the decline reply, and the one place every reply is written to the site's
egress audit log (client/audit.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Context, Error, Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from client.audit import record_egress
from client.clipping import requested_clipping_norm
from common.config import SiteSettings
from common.flower import arrays_from_record
from common.wire import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    DECLINED_ERROR_CODE,
    METRICS_RECORD,
    ROUND_OFFSET,
    SERVER_ROUND,
    absolute_round,
)


def declined_reply(msg: Message, reason: str) -> Message:
    """The site's "declined this round" reply (e.g. its privacy budget is spent): not a failure."""
    return Message(Error(code=DECLINED_ERROR_CODE, reason=f"site declined: {reason}"), reply_to=msg)


def audit_reply(
    context: Context,
    site: SiteSettings,
    msg: Message,
    reply: Message,
    *,
    stage: str | None = None,
    privacy: Mapping[str, Any] | None = None,
    timing: Mapping[str, float] | None = None,
) -> None:
    """Log what ``reply`` (the answer to ``msg``) carries out of the site.

    ``stage``: the SecAgg+ stage ``msg`` asked for (``secagg_stage``, read before the protocol
    handles ``msg``), None for a Message-API message. A decline is logged with nothing sent; another
    error reply carries only its reason and is not logged. Under client-level DP the requested
    clipping norm joins ``privacy``.
    """
    declined = reply.has_error()
    if declined and int(reply.error.code) != DECLINED_ERROR_CODE:
        return
    privacy = dict(privacy or {})
    if not declined and (norm := requested_clipping_norm(msg)) is not None:
        privacy["client-dp-clipping-norm"] = norm
    arrays: dict[str, np.ndarray] = {}
    metrics: dict[str, float | int] = {}
    protocol: tuple[str, Mapping[str, Any]] | None = None
    if stage is not None:  # a SecAgg+ stage (client/secagg.py)
        server_round = int(msg.metadata.group_id or 0)
        if not declined:
            fields, metrics, arrays = secagg_payload(reply)
            protocol = (stage, fields)
    else:
        config: dict[str, Any] = dict(msg.content.config_records.get(CONFIG_RECORD) or {})
        server_round = absolute_round(config.get(SERVER_ROUND, 0), config.get(ROUND_OFFSET, 0))
        if not declined:
            if ARRAYS_RECORD in reply.content.array_records:
                arrays = arrays_from_record(reply.content.array_records[ARRAYS_RECORD])
            if METRICS_RECORD in reply.content.metric_records:
                sent = reply.content.metric_records[METRICS_RECORD]
                metrics = {k: v for k, v in sent.items() if isinstance(v, int | float)}
    record_egress(
        site.state_path,
        run_id=context.run_id,
        server_round=server_round,
        message_type=msg.metadata.message_type,
        site=site.name,
        arrays=arrays,
        metrics=metrics,
        declined=declined,
        privacy=privacy,
        protocol=protocol,
        timing=None if declined else timing,
    )


def secagg_stage(msg: Message) -> str | None:
    """The SecAgg+ stage ``msg`` asks for; None when it is not a SecAgg+ message."""
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    return None if configs is None else str(configs.get(Key.STAGE, ""))


def secagg_payload(
    reply: Message,
) -> tuple[dict[str, Any], dict[str, float | int], dict[str, np.ndarray]]:
    """Everything a SecAgg+ reply carries: protocol fields, scalar metrics, and any (unmasked) arrays."""
    content = reply.content
    fields: dict[str, Any] = {}
    metrics: dict[str, float | int] = {}
    arrays: dict[str, np.ndarray] = {}
    for name, config in content.config_records.items():
        if name == RECORD_KEY_CONFIGS:
            fields.update(dict(config))
        elif name == "fitres.status":
            fields.update({f"status.{k}": v for k, v in config.items()})
        elif name == "fitres.metrics":
            metrics.update({k: v for k, v in config.items() if isinstance(v, int | float)})
            fields.update({f"metric:{k}": v for k, v in config.items() if k not in metrics})
        else:
            fields[f"record:{name}"] = str(dict(config))
    for name, record in content.metric_records.items():
        if name == "fitres.num_examples":  # the site's SecAgg+ weight, sent in the clear
            metrics.update({k: v for k, v in record.items() if isinstance(v, int | float)})
        else:
            fields[f"record:{name}"] = str(dict(record))
    for name, array_record in content.array_records.items():
        arrays.update({f"{name}/{k}": a.numpy() for k, a in array_record.items()})
    return fields, metrics, arrays
