"""Flower messages for tests without a Flower runtime: message metadata, and ``StandInGrid``, the
base of the tests' in-process grids."""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, Metadata, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run


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


class StandInGrid(Grid):
    """A Flower ``Grid`` in this process: messages are created as the real grid's are (run 1,
    from the SuperLink's node id), pushed messages are kept under ids m0, m1, ... with the time
    they were pushed; a subclass lists its nodes and answers in ``pull_messages``."""

    def __init__(self) -> None:
        self.pushed: dict[str, Message] = {}
        self.pushed_at: dict[str, float] = {}

    def set_run(self, run: Run) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Run:
        raise NotImplementedError

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        metadata = message_metadata(
            dst_node_id=dst_node_id,
            group_id=group_id,
            ttl=ttl or 3600.0,
            message_type=message_type,
        )
        return Message(metadata=metadata, content=content)  # type: ignore[call-overload]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message_id = f"m{len(self.pushed)}"
            message.metadata.__dict__["_message_id"] = message_id
            self.pushed[message_id] = message
            self.pushed_at[message_id] = time.monotonic()
            ids.append(message_id)
        return ids
