"""Client-level DP at the site: Flower's ``fixedclipping_mod``, applied only when the server asks for it.

The server's ``DifferentialPrivacyClientSideFixedClipping`` (server/privacy.py) puts the clipping norm
in every train config. ``fixedclipping_mod`` alone answers a message without that key with an error
reply, which would break runs without client-level DP; ``clip_update_mod`` passes those through.
Scalar parameters are clipped too (Flower skips 0-d arrays: see common/dp_clipping.py).
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from common.dp_clipping import lift_scalars, record_shapes, restore_shapes


def requested_clipping_norm(msg: Message) -> float | None:
    """The clipping norm the server's DP wrapper put in the message's config (None: not requested)."""
    for record in msg.content.config_records.values():
        if KEY_CLIPPING_NORM in record:
            return float(record[KEY_CLIPPING_NORM])  # type: ignore[arg-type]
    return None


def clip_update_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A Flower mod: ``fixedclipping_mod`` (reply = incoming head + update clipped to the requested
    L2 norm) when the config carries a clipping norm, ``call_next`` unchanged otherwise."""
    if requested_clipping_norm(msg) is None:
        return call_next(msg, context)
    if len(msg.content.array_records) != 1:
        return fixedclipping_mod(msg, context, call_next)  # its error reply says why
    ((key, head),) = msg.content.array_records.items()
    shapes = record_shapes(head)

    def local_round(_: Message, ctx: Context) -> Message:
        msg.content[key] = head  # the handler gets the head exactly as the server sent it
        return _map_arrays(call_next(msg, ctx), lift_scalars)

    msg.content[key] = lift_scalars(head)
    try:
        reply = fixedclipping_mod(msg, context, local_round)
    finally:
        msg.content[key] = head
    return _map_arrays(reply, lambda record: restore_shapes(record, shapes))


def _map_arrays(reply: Message, change: Callable[[ArrayRecord], ArrayRecord]) -> Message:
    if not reply.has_error():
        for name, record in list(reply.content.array_records.items()):
            reply.content[name] = change(record)
    return reply
