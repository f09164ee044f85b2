"""What leaves the site: the decline reply, and the one place every reply is written to the site's
egress audit log (client/audit.py; the reply split and digested by common/digest.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Context, Error, Message

from client.audit import record_egress
from client.clipping import requested_clipping_norm
from common.config import SiteSettings
from common.digest import message_round, reply_payload, secagg_stage, sent_head
from common.wire import DECLINED_ERROR_CODE

__all__ = ["audit_reply", "declined_reply", "secagg_stage"]


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
    error reply carries only its reason and is not logged. Everything else in the reply is logged
    (common/digest.py ``reply_payload``: every record, metrics as sent), with the head ``msg``
    carried, which the reply is checked against. Under client-level DP the requested clipping norm
    joins ``privacy``.
    """
    declined = reply.has_error()
    if declined and int(reply.error.code) != DECLINED_ERROR_CODE:
        return
    privacy = dict(privacy or {})
    if not declined and (norm := requested_clipping_norm(msg)) is not None:
        privacy["client-dp-clipping-norm"] = norm
    payload = None if declined else reply_payload(reply.content, secagg=stage is not None)
    protocol = (stage, payload.fields) if payload and payload.fields is not None and stage else None
    record_egress(
        site.state_path,
        run_id=context.run_id,
        server_round=message_round(msg, stage=stage),
        message_type=msg.metadata.message_type,
        site=site.name,
        arrays=payload.arrays if payload else {},
        metrics=payload.metrics if payload else {},
        declined=declined,
        privacy=privacy,
        protocol=protocol,
        timing=None if declined else timing,
        node_id=context.node_id,
        head=sent_head(msg, stage=stage),
        extra=payload.extra if payload else None,
        stage=stage,
    )
