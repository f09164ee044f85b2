"""The coordinator's receipts (server/receipts.py): the digest of every reply it pulled equals the one
the site logged when the reply arrived as sent, and differs, naming the line, when it was changed."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.serverapp import Grid

from client.app import app as client_app
from client.audit import audit_path, verify_audit_log
from client.egress import audit_reply
from common.config import SiteSettings
from common.flower import arrays_from_record, metric_record, record_from_arrays
from server.receipts import ReceiptGrid, read_receipts, receipts_path
from server.secagg import ProtocolGrid
from tests.flower_messages import StandInGrid

HEAD: dict[str, np.ndarray] = {
    "proj.weight": np.arange(12, dtype=np.float32).reshape(4, 3),
    "scale": np.asarray(2.0, dtype=np.float32),
}
RUN_ID = 11


def _wire(message: Message) -> Message:
    """``message`` as the other end reads it: serialized to Flower's protobuf bytes and back."""
    return message_from_proto(
        ProtoMessage.FromString(message_to_proto(message).SerializeToString())
    )


Site = Callable[[Message, Context], Message]


def _normal_site(message: Message, context: Context) -> Message:
    """A site's train/evaluate answer, logged by the site's one audit call site before it leaves."""
    site = SiteSettings.from_node_config(dict(context.node_config))
    if message.metadata.message_type == "evaluate":
        reply = Message(
            RecordDict({"metrics": metric_record({"num-examples": 4})}), reply_to=message
        )
    else:
        trained = {
            k: v + 1 for k, v in arrays_from_record(message.content.array_records["arrays"]).items()
        }
        content = RecordDict(
            {
                "arrays": record_from_arrays(trained),
                "metrics": metric_record({"num-examples": 4, "train-loss": 0.3}),
            }
        )
        reply = Message(content, reply_to=message)
    audit_reply(context, site, message, reply)
    return reply


class SiteGrid(StandInGrid):
    """A grid whose nodes are sites answering in this process; every message and reply crosses
    Flower's protobuf serialization. ``tamper``: change each train reply's head after it was logged."""

    def __init__(self, root: Path, site: Site, *, tamper: bool = False) -> None:
        super().__init__()
        self.root, self.site, self.tamper = root, site, tamper
        self.contexts: dict[int, Context] = {}

    def context(self, node: int) -> Context:
        if node not in self.contexts:
            node_config = {
                "site-name": f"site-{node}",
                "state-dir": str(self.root / f"site-{node}"),
            }
            run_config: dict[str, Any] = {"secure-aggregation": True, "min-sites": 3}
            self.contexts[node] = Context(
                run_id=RUN_ID,
                node_id=node,
                node_config=node_config,  # type: ignore[arg-type]
                state=RecordDict(),
                run_config=run_config,
            )
        return self.contexts[node]

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = []
        for message_id in message_ids:
            received = _wire(self.pushed[message_id])
            received.metadata.__dict__["_message_id"] = message_id
            reply = self.site(received, self.context(received.metadata.dst_node_id))
            if self.tamper and "arrays" in reply.content.array_records:
                arrays = arrays_from_record(reply.content.array_records["arrays"])
                arrays["proj.weight"][0, 0] += 1e-3  # after the site logged what it sent
                reply.content["arrays"] = record_from_arrays(arrays)
            reply.metadata.__dict__["_reply_to_message_id"] = message_id
            replies.append(_wire(reply))
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        raise AssertionError("the ReceiptGrid polls itself")


def _round(grid: Grid, server_round: int, message_type: str = "train") -> list[Message]:
    config = ConfigRecord({"server-round": server_round, "round-offset": 1})
    content = RecordDict({"arrays": record_from_arrays(HEAD), "config": config})
    return [grid.create_message(content, message_type, node, str(server_round)) for node in (5, 6)]


def _federation(tmp_path: Path, *, tamper: bool = False) -> tuple[SiteGrid, Path]:
    sites = SiteGrid(tmp_path, _normal_site, tamper=tamper)
    grid = ReceiptGrid(sites, run_dir=tmp_path / "run", run_id=RUN_ID, poll_interval=0.01)
    for server_round in (1, 2):
        assert len(list(grid.send_and_receive(_round(grid, server_round), timeout=5))) == 2
    assert len(list(grid.send_and_receive(_round(grid, 2, "evaluate"), timeout=5))) == 2
    return sites, tmp_path / "run"


def test_the_coordinator_receipts_equal_the_sites_audit_lines(tmp_path: Path) -> None:
    _, run_dir = _federation(tmp_path)
    receipts = read_receipts(run_dir)
    assert len(receipts) == 6
    for node in (5, 6):
        log = audit_path(tmp_path / f"site-{node}")
        lines = [json.loads(line) for line in log.read_text().splitlines()]
        mine = [r for r in receipts if r["node_id"] == node]
        # the absolute round (server-round + round-offset), type and digest of each reply agree
        assert [(e["round"], e["message_type"], e["sha256"]) for e in lines] == [
            (r["round"], r["message_type"], r["sha256"]) for r in mine
        ]
        assert [e["round"] for e in lines] == [2, 3, 3]
        summary = verify_audit_log(log, receipts=receipts)
        assert summary.ok and summary.confirmed == 3 and not summary.unconfirmed, summary


def test_a_tampered_reply_is_detected(tmp_path: Path) -> None:
    _, run_dir = _federation(tmp_path, tamper=True)
    receipts = read_receipts(run_dir)
    summary = verify_audit_log(audit_path(tmp_path / "site-5"), receipts=receipts)
    assert summary.confirmed == 1  # the evaluate reply was not changed
    assert len(summary.violations) == 2, summary.violations
    for line, server_round in ((1, 2), (2, 3)):
        assert any(
            v.startswith(f"line {line} (run {RUN_ID}, round {server_round}, train reply)")
            and "the reply that arrived is not the one logged" in v
            for v in summary.violations
        ), summary.violations


def test_a_reply_missing_from_the_log_is_flagged_and_an_unreceived_one_noted(
    tmp_path: Path,
) -> None:
    _, run_dir = _federation(tmp_path)
    log = audit_path(tmp_path / "site-6")
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[1:]) + "\n")  # the site "forgot" round 2's reply
    receipts = read_receipts(run_dir)
    violations = verify_audit_log(log, receipts=receipts).violations
    assert violations == [
        f"the coordinator received a train reply of run {RUN_ID}, round 2 from this site "
        "(node 6) that the audit log does not record"
    ]
    # a reply the coordinator never pulled (after the deadline) is a note, not a violation
    other = audit_path(tmp_path / "site-5")
    summary = verify_audit_log(other, receipts=[r for r in receipts if r["round"] != 3])
    assert summary.ok and len(summary.unconfirmed) == 2
    assert "no coordinator receipt" in summary.unconfirmed[0]


def test_secagg_protocol_replies_have_receipts_equal_to_their_audit_lines(tmp_path: Path) -> None:
    """Flower's SecAgg+ setup stage answered by the real ClientApp, through the ProtocolGrid."""
    sites = SiteGrid(tmp_path, client_app)
    grid = ProtocolGrid(sites, poll_interval=0.01, run_dir=tmp_path / "run", run_id=RUN_ID)
    config = ConfigRecord(
        {
            Key.STAGE: Stage.SETUP,
            Key.SAMPLE_NUMBER: 3,
            Key.SHARE_NUMBER: 3,
            Key.THRESHOLD: 2,
            Key.CLIPPING_RANGE: 8.0,
            Key.TARGET_RANGE: 4194304,
            Key.MOD_RANGE: 2**32,
            Key.MAX_WEIGHT: 64.0,
        }
    )
    messages = [
        grid.create_message(RecordDict({RECORD_KEY_CONFIGS: config}), "train", node, "1")
        for node in (5, 6)
    ]
    started = time.time()
    assert len(list(grid.send_and_receive(messages, timeout=30))) == 2
    receipts = read_receipts(tmp_path / "run")
    assert [(r["stage"], r["round"]) for r in receipts] == [("setup", 1), ("setup", 1)]
    assert all(r["time"] >= started and r["sha256"] for r in receipts)
    for node in (5, 6):
        summary = verify_audit_log(audit_path(tmp_path / f"site-{node}"), receipts=receipts)
        assert summary.ok and summary.confirmed == 1 and summary.secagg_replies == 1, summary
    # the same check catches a digest that is not the logged one
    forged = [{**r, "sha256": "0" * 64} for r in receipts]
    summary = verify_audit_log(audit_path(tmp_path / "site-5"), receipts=forged)
    assert not summary.ok and "SecAgg+ setup" in summary.violations[0]


def test_without_a_run_dir_the_grid_records_nothing(tmp_path: Path) -> None:
    sites = SiteGrid(tmp_path, _normal_site)
    grid = ReceiptGrid(sites, poll_interval=0.01)
    assert len(list(grid.send_and_receive(_round(grid, 1), timeout=5))) == 2
    assert not receipts_path(tmp_path).exists() and read_receipts(tmp_path) == []
