"""The coordinator's receipts: one line per site reply it pulled, with the digest of what arrived.

Every reply the ServerApp pulls is split and digested exactly as the site split and digested it
before sending (common/digest.py), and appended to ``<run-dir>/replies.jsonl`` with the run, round,
node, message type and SecAgg+ stage it answers. ``fedembed audit <site> --run <run-dir>`` then
matches each line of the site's audit log to its receipt: equal digests show the coordinator
received exactly what the site logged; a different one, that the reply changed on the way (or the
log does not hold what was sent).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from common.atomic import append_line
from common.digest import message_round, reply_payload, secagg_stage
from server.grid import PromptGrid
from server.strategy import site_name

log = logging.getLogger(__name__)

RECEIPTS_FILE = "replies.jsonl"


def receipts_path(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / RECEIPTS_FILE


def receipt(sent: Message, reply: Message, *, run_id: int) -> dict[str, Any]:
    """The coordinator's record of ``reply`` (the answer to ``sent``): what it answers and its digest.

    An error reply carries no payload: its code is recorded instead. A payload that cannot be
    split is recorded as undecodable (with the reason) rather than taking the coordinator down.
    """
    stage = secagg_stage(sent)
    record: dict[str, Any] = {
        "run_id": int(run_id),
        "round": message_round(sent, stage=stage),
        "node_id": int(sent.metadata.dst_node_id),
        "site": site_name(reply),
        "message_type": sent.metadata.message_type,
        "stage": stage,
        "sha256": None,
        "error": None,
        "time": time.time(),
    }
    if reply.has_error():
        record["error"] = int(reply.error.code)
        return record
    try:
        record["sha256"] = reply_payload(reply.content, secagg=stage is not None).digest
    except Exception as exc:  # a malformed payload must never take the coordinator down
        record["undecodable"] = f"{type(exc).__name__}: {exc}"[:300]
    return record


def record_receipts(
    run_dir: str | os.PathLike[str],
    sent: Iterable[Message],
    replies: Iterable[Message],
    *,
    run_id: int,
) -> list[dict[str, Any]]:
    """Append a receipt for each of ``replies`` (answers to ``sent``) to the run's receipts file."""
    by_id = {m.metadata.message_id: m for m in sent}
    records = []
    for reply in replies:
        message = by_id.get(reply.metadata.reply_to_message_id)
        if message is None:
            log.warning("a reply to an unknown message %s", reply.metadata.reply_to_message_id)
            continue
        records.append(receipt(message, reply, run_id=run_id))
    for record in records:
        append_line(receipts_path(run_dir), json.dumps(record, sort_keys=True))
    return records


def read_receipts(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The receipts of a run directory (a line cut by a crash is skipped)."""
    path = receipts_path(run_dir)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class ReceiptGrid(PromptGrid):
    """``PromptGrid`` that records a receipt of every reply it returns (``run_dir`` None: none)."""

    def __init__(
        self,
        grid: Grid,
        *,
        run_dir: str | os.PathLike[str] | None = None,
        run_id: int = 0,
        poll_interval: float,
        first_round_timeout: float | None = None,
    ) -> None:
        super().__init__(grid, poll_interval=poll_interval, first_round_timeout=first_round_timeout)
        self.run_dir = run_dir
        self.run_id = run_id

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        replies = list(super().send_and_receive(messages, timeout=timeout))
        if self.run_dir is not None:
            record_receipts(self.run_dir, messages, replies, run_id=self.run_id)
        return replies
