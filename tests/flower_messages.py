"""Flower message metadata for tests that build Messages without a Flower runtime."""

from __future__ import annotations

import time

from flwr.app import Metadata


def message_metadata(
    *,
    dst_node_id: int,
    src_node_id: int = 1,
    message_id: str = "",
    group_id: str = "1",
    ttl: float = 3600.0,
    message_type: str = "train",
) -> Metadata:
    """Metadata of a message of run 1, created now."""
    return Metadata(
        run_id=1,
        message_id=message_id,
        src_node_id=src_node_id,
        dst_node_id=dst_node_id,
        reply_to_message_id="",
        group_id=group_id,
        created_at=time.time(),
        ttl=ttl,
        message_type=message_type,
    )
