"""A federation in one process for server tests: the ServerApp's body sends Flower Messages that
fedembed's real ClientApp (with its mods) answers, each site with its own Context and node-config.
Only the transport is a stand-in (no SuperLink)."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from flwr.app import Context, Error, Message
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from client.app import app
from common.wire import CLIENT_APP_RAISED_EXCEPTION
from tests.server.test_grid import DelayedGrid


def serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's runtime sets the identity of a ServerApp process; building a Message needs it."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


class ClientAppSites(DelayedGrid):
    """Each pushed message is handled by fedembed's ClientApp with its site's Context."""

    def __init__(self, contexts: dict[int, Context]) -> None:
        super().__init__(dict.fromkeys(contexts, 0.0))
        self.contexts = contexts
        self.replies: dict[str, Message] = {}

    @property
    def run(self) -> Run:
        return Run.create_empty(1)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = list(super().push_messages(messages))
        for message_id in ids:
            message = self.pushed[message_id]
            context = self.contexts[message.metadata.dst_node_id]
            try:
                reply = app(message, context)
            except Exception as exc:  # what Flower's ClientApp runtime replies (run_clientapp.py)
                reason = f"{type(exc)}:<'{exc}'>"
                reply = Message(Error(CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
            self.replies[message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self.replies.pop(i) for i in message_ids if i in self.replies]
