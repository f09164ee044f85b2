"""PromptGrid returns replies as soon as they arrive, keeps Flower's timeout semantics, delegates the rest."""

from __future__ import annotations

import time
from collections.abc import Iterable

import pytest
from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from server.grid import PromptGrid
from tests.flower_messages import StandInGrid


class DelayedGrid(StandInGrid):
    """A grid whose sites answer ``delays[node]`` seconds after the push (None: never)."""

    def __init__(self, delays: dict[int, float | None]) -> None:
        super().__init__()
        self.delays = delays

    def get_node_ids(self) -> Iterable[int]:
        return list(self.delays)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        now, replies = time.monotonic(), []
        for message_id in message_ids:
            message, pushed = self.pushed[message_id], self.pushed_at[message_id]
            delay = self.delays[message.metadata.dst_node_id]
            if delay is not None and now - pushed >= delay:
                reply = Message(RecordDict({"metrics": MetricRecord({"x": 1.0})}), reply_to=message)
                replies.append(reply)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        raise AssertionError("PromptGrid must poll itself, not call Flower's 3 s loop")


def _messages(grid: Grid, nodes: Iterable[int]) -> list[Message]:
    return [grid.create_message(RecordDict(), "train", node, "g") for node in nodes]


def test_replies_are_collected_as_soon_as_they_arrive() -> None:
    inner = DelayedGrid({1: 0.1, 2: 0.3})
    grid = PromptGrid(inner, poll_interval=0.05)
    started = time.monotonic()
    replies = list(grid.send_and_receive(_messages(grid, [1, 2]), timeout=10))
    elapsed = time.monotonic() - started
    assert len(replies) == 2
    assert elapsed < 1.0  # Flower's own grid would take at least 3 s here
    assert grid.pulls >= 3


def test_missing_replies_are_left_out_at_the_timeout() -> None:
    grid = PromptGrid(DelayedGrid({1: 0.05, 2: None}), poll_interval=0.05)
    started = time.monotonic()
    replies = list(grid.send_and_receive(_messages(grid, [1, 2]), timeout=0.4))
    assert len(replies) == 1
    assert 0.4 <= time.monotonic() - started < 1.5


def test_a_sites_first_round_waits_longer_while_it_embeds() -> None:
    grid = PromptGrid(DelayedGrid({1: 0.5, 2: 0.5}), poll_interval=0.05, first_round_timeout=2.0)
    started = time.monotonic()
    assert len(list(grid.send_and_receive(_messages(grid, [1]), timeout=0.2))) == 1
    assert 0.5 <= time.monotonic() - started < 2.0
    assert list(grid.received_at) == ["m0"]  # when each reply came: the round timing in history
    started = time.monotonic()  # node 1 has answered before: the round timeout holds
    assert list(grid.send_and_receive(_messages(grid, [1]), timeout=0.2)) == []
    assert time.monotonic() - started < 0.5 and grid.received_at == {}
    # A new node (a site that joined or restarted) gets the first-round timeout again.
    replies = list(grid.send_and_receive(_messages(grid, [1, 2]), timeout=0.2))
    assert len(replies) == 2


def test_everything_else_is_delegated() -> None:
    inner = DelayedGrid({7: 0.0, 9: 0.0})
    grid = PromptGrid(inner)
    assert list(grid.get_node_ids()) == [7, 9]
    assert [n.node_id for n in grid.get_nodes()] == [7, 9]


def test_poll_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="poll_interval"):
        PromptGrid(DelayedGrid({}), poll_interval=0)
