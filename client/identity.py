"""A ClientApp mod that names the site in its train replies, so the server's history can say which site did what."""

from __future__ import annotations

import logging
from functools import lru_cache

from flwr.app import ConfigRecord, Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable

from client.worker import WorkerFailed
from common.config import SiteSettings
from common.wire import (
    ARRAYS_RECORD,
    CLIENT_APP_RAISED_EXCEPTION,
    SITE_NAME_KEY,
    SITE_RECORD,
    site_error_reason,
)

log = logging.getLogger(__name__)


def site_settings(context: Context) -> SiteSettings:
    """The site's settings from the SuperNode's node-config (parsed once per process)."""
    return _parse_node_config(tuple(sorted(context.node_config.items())))


@lru_cache(maxsize=8)
def _parse_node_config(items: tuple[tuple[str, object], ...]) -> SiteSettings:
    return SiteSettings.from_node_config(dict(items))


def site_identity_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Add ``site = {"name": <site name>}`` to a train reply, or ``[site NAME]`` before an error's reason.

    Node ids change whenever a SuperNode restarts; the site name (node-config ``site-name``) does
    not. An exception in the handler becomes the same error reply Flower would send, named.
    Nothing else is added: the name is the only thing this sends beside the head and metrics.
    """
    if msg.metadata.message_type != "train":
        return call_next(msg, context)
    name = site_settings(context).name
    try:
        reply = call_next(msg, context)
    except Exception as exc:  # what Flower would send, with the site's name in front
        log.exception("site %s: the train handler raised", name)
        # the site worker's WorkerFailed already reads "<the original error's type>: <message>"
        detail = str(exc) if isinstance(exc, WorkerFailed) else f"{type(exc).__name__}: {exc}"
        reason = site_error_reason(name, detail)
        return Message(Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
    if reply.has_error():
        reason = site_error_reason(name, str(reply.error.reason))
        return Message(Error(code=reply.error.code, reason=reason), reply_to=msg)
    if ARRAYS_RECORD in reply.content.array_records:
        reply.content[SITE_RECORD] = ConfigRecord({SITE_NAME_KEY: name})
    return reply
