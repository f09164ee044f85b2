"""A Grid wrapper that collects site replies as soon as they arrive instead of on Flower's fixed 3 s cadence."""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run

DEFAULT_POLL_INTERVAL = 0.2


class DelegatingGrid(Grid):
    """A Grid that forwards every call to ``inner``; subclasses override what they change."""

    def __init__(self, grid: Grid) -> None:
        self.inner = grid
        # The last exchange: message id -> when its reply was pulled (time.time()); subclasses
        # that time replies fill it, the round history reads it.
        self.received_at: dict[str, float] = {}

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.inner.send_and_receive(messages, timeout=timeout)


class PromptGrid(DelegatingGrid):
    """Delegates everything to Flower's grid, but polls for replies every ``poll_interval`` seconds.

    Flower 1.41's deployment grid sleeps a fixed 3 s between pulls, so every message exchange lasts
    a multiple of 3 s however fast the sites answer. This wrapper uses only the Grid's public
    ``push_messages`` / ``pull_messages``: the semantics of ``send_and_receive`` (replies that are not
    in by ``timeout`` are simply missing) are unchanged. ``received_at`` maps each message id of the
    last exchange to the wall-clock time its reply was pulled (the round timing in the history).

    ``first_round_timeout`` replaces a shorter ``timeout`` for an exchange that includes a node that
    has not answered this ServerApp before (a site's first round also embeds its data, and a
    restarted site has a new node id): a site still embedding is not dropped, and a site that dies
    later costs its round only the (shorter) round timeout.
    """

    def __init__(
        self,
        grid: Grid,
        *,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        first_round_timeout: float | None = None,
    ) -> None:
        if poll_interval <= 0:
            raise ValueError("poll_interval must be > 0")
        super().__init__(grid)
        self.poll_interval = poll_interval
        self.first_round_timeout = first_round_timeout
        self.answered: set[int] = set()  # nodes that have replied (a SuperLink error is no reply)
        self.pulls = 0

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        return self.inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages``; return the replies received before ``timeout`` seconds (all, if None)."""
        messages = list(messages)
        if (
            timeout is not None
            and self.first_round_timeout is not None
            and any(m.metadata.dst_node_id not in self.answered for m in messages)
        ):
            timeout = max(timeout, self.first_round_timeout)
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        self.received_at = {}
        while pending:
            received = list(self.pull_messages(pending))
            now = time.time()
            self.received_at.update((m.metadata.reply_to_message_id, now) for m in received)
            self.answered.update(m.metadata.src_node_id for m in received)
            replies.extend(received)
            pending.difference_update(m.metadata.reply_to_message_id for m in received)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.poll_interval)
        return replies
