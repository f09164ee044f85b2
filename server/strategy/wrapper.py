"""The strategy wrapper: validates every reply, accounts per site, quarantines dropped nodes, evaluates sparsely."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common.flower import arrays_from_record, record_from_arrays, record_nbytes
from common.wire import METRICS_RECORD, ROUND_OFFSET, SITE_RECORD, absolute_round
from server.grid import DelegatingGrid
from server.strategy.contract import UpdateCheck, classify_error, metric_problem, short_reason
from server.strategy.rounds import Accounting, EmptyRounds, RoundLog
from server.strategy.state import has_optimizer_state, optimizer_state, restore_optimizer_state

log = logging.getLogger(__name__)


class FedEmbedStrategy(Strategy):
    """Flower strategy ``inner`` with update validation, per-site outcomes, and sparse evaluation."""

    def __init__(
        self,
        inner: Strategy,
        *,
        check: UpdateCheck,
        accounting: Accounting,
        round_offset: int,
        evaluate_every: int,
        last_round: int,
        min_available: int = 1,
        empty_rounds: EmptyRounds,
    ) -> None:
        self.inner = inner
        self.check = check
        self.accounting = accounting
        self.round_offset = round_offset
        self.evaluate_every = evaluate_every
        self.last_round = last_round
        self.min_available = min_available
        self.empty_rounds = empty_rounds
        self._sent: list[Message] = []
        self._grid: Grid | None = None

    def summary(self) -> None:
        self.inner.summary()

    def server_state(self) -> dict[str, np.ndarray]:
        """The inner strategy's optimiser state after its last round (server/strategy/state.py)."""
        return optimizer_state(self.inner)

    def restore_server_state(self, state: Mapping[str, np.ndarray], head_keys: list[str]) -> None:
        restore_optimizer_state(self.inner, state, head_keys)

    @property
    def has_server_state(self) -> bool:
        return has_optimizer_state(self.inner)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.accounting.global_arrays = arrays_from_record(arrays)
        config[ROUND_OFFSET] = self.round_offset
        entry = self.accounting.current(absolute_round(server_round, self.round_offset))
        self._grid = grid
        view = self._sampling_view(grid, entry)
        messages = list(self.inner.configure_train(server_round, arrays, config, view))
        self._sent = messages  # the Grid fills in their message ids when it pushes them
        entry.sampled = [m.metadata.dst_node_id for m in messages]
        entry.bytes_sent = {m.metadata.dst_node_id: record_nbytes(arrays) for m in messages}
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        entry = self.accounting.current(absolute_round(server_round, self.round_offset))
        received_at = self._grid.received_at if isinstance(self._grid, DelegatingGrid) else {}
        # A SuperLink-generated error (dead node) comes from node 1: map replies to their target.
        target = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent}
        accepted: list[Message] = []
        answered: set[int] = set()
        for reply in replies:
            node = target.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            answered.add(node)
            entry.timing[node] = {"replied": reply.metadata.created_at - entry.started}
            if reply.metadata.reply_to_message_id in received_at:
                entry.timing[node]["received"] = (
                    received_at[reply.metadata.reply_to_message_id] - entry.started
                )
            self.accounting.learn_name(node, reply)
            if reply.has_error():
                self._record_error(entry, node, reply)
                continue
            entry.bytes_received[node] = _reply_bytes(reply)
            issues = self.check.problems(reply, self.accounting.global_arrays)
            if issues:
                entry.rejected[node] = "; ".join(issues)
                continue
            accepted.append(reply)
            entry.sites.append(node)
            entry.site_metrics[node] = {
                k: float(v)
                for k, v in reply.content.metric_records[METRICS_RECORD].items()
                if isinstance(v, (int, float))
            }
        for node in entry.sampled:
            if node not in answered:
                entry.dropped[node] = "no reply within the round timeout"
        self._quarantine(entry)
        entry.names = {
            n: self.accounting.names[n]
            for n in {*entry.sampled, *answered, *entry.skipped}
            if n in self.accounting.names
        }
        self._log_outcomes(entry)
        arrays: ArrayRecord | None = None
        metrics: MetricRecord | None = None
        if accepted:
            arrays, metrics = self.inner.aggregate_train(server_round, _uniform_metrics(accepted))
            arrays = _float32(arrays)
        entry.head_updated = arrays is not None
        if not entry.head_updated:
            log.warning("round %d: nothing aggregated; the global head is unchanged", entry.round)
        reasons = [] if entry.head_updated else self._not_aggregated(entry, len(accepted))
        self.empty_rounds.record(entry.round, updated=entry.head_updated, reasons=reasons)
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        absolute = absolute_round(server_round, self.round_offset)
        due = absolute == self.last_round or (
            self.evaluate_every > 0 and absolute % self.evaluate_every == 0
        )
        if not due:
            return []
        config[ROUND_OFFSET] = self.round_offset
        view = self._sampling_view(grid, None)
        return self.inner.configure_evaluate(server_round, arrays, config, view)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Aggregate the valid evaluate replies (finite scalar metrics, positive num-examples)."""
        entry = self.accounting.current(absolute_round(server_round, self.round_offset))
        valid = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                problem: str | None = f"site error: {short_reason(str(reply.error.reason))}"
            elif (
                set(reply.content.keys()) - {SITE_RECORD} != {METRICS_RECORD}
                or METRICS_RECORD not in reply.content.metric_records
            ):
                problem = f"unexpected records {sorted(reply.content.keys())[:5]}"
            else:
                problem = metric_problem(reply.content.metric_records[METRICS_RECORD])
            if problem is None:
                valid.append(reply)
            else:
                entry.evaluate_rejected[node] = problem
                log.warning(
                    "round %d: evaluate reply of %s ignored: %s",
                    entry.round,
                    entry.display(node),
                    problem,
                )
        if not valid:
            return None
        return self.inner.aggregate_evaluate(server_round, _uniform_metrics(valid))

    def _record_error(self, entry: RoundLog, node: int, reply: Message) -> None:
        kind, reason = classify_error(reply)
        getattr(entry, kind)[node] = reason  # entry.declined, entry.dropped or entry.failed

    def _not_aggregated(self, entry: RoundLog, valid: int) -> list[str]:
        """Why nothing reached the global head: each site's outcome, and a release refused."""
        reasons = entry.shortfalls()
        if valid:
            reasons.append(
                f"{valid} valid update(s), but {type(self.inner).__name__} released no aggregate "
                "(client-dp releases only rounds with min-sites valid updates)"
            )
        return reasons

    def _sampling_view(self, grid: Grid, entry: RoundLog | None) -> Grid:
        """``grid`` without quarantined nodes, unless that would leave too few to sample."""
        if not self.accounting.quarantine:
            return grid
        nodes = _nodes(grid)
        if nodes is None:
            return grid
        online = {n.node_id: n for n in nodes}
        for node, seen_until in list(self.accounting.quarantine.items()):
            info = online.get(node)
            if info is None or info.online_until > seen_until:  # gone, or a heartbeat came
                del self.accounting.quarantine[node]
        held = set(self.accounting.quarantine) & set(online)
        if not held or len(online) - len(held) < self.min_available:
            return grid
        if entry is not None:
            for node in held:
                entry.skipped[node] = "missed the last deadline; no heartbeat since"
        return _FilteredGrid(grid, excluded=held)

    def _quarantine(self, entry: RoundLog) -> None:
        if not entry.dropped or self._grid is None:
            return
        nodes = _nodes(self._grid)
        if nodes is None:
            return
        for info in nodes:
            if info.node_id in entry.dropped:
                self.accounting.quarantine[info.node_id] = float(info.online_until)

    def _log_outcomes(self, entry: RoundLog) -> None:
        for node, outcome in entry.outcomes_by_node().items():
            if outcome != "aggregated":
                log.warning("round %d: site %s %s", entry.round, entry.display(node), outcome)


class _FilteredGrid(DelegatingGrid):
    """A view of a Grid that hides some nodes from sampling; everything else is delegated."""

    def __init__(self, grid: Grid, *, excluded: set[int]) -> None:
        super().__init__(grid)
        self.excluded = excluded

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.inner.get_node_ids() if n not in self.excluded]

    def get_nodes(self) -> Iterable[NodeInfo]:
        return [n for n in self.inner.get_nodes() if n.node_id not in self.excluded]


def _nodes(grid: Grid) -> list[NodeInfo] | None:
    """The SuperLink's node list with liveness (None where the grid cannot tell)."""
    try:
        nodes = list(grid.get_nodes())
    except Exception as exc:  # a grid without node details: no quarantine, never a crash
        log.debug("node details unavailable: %s", exc)
        return None
    return nodes if all(n.HasField("online_until") for n in nodes) else None


def _uniform_metrics(replies: list[Message]) -> list[Message]:
    """The replies with only the metrics every one of them has (Flower's strategies raise, killing
    the ServerApp, when metric keys differ between replies) and without the site record."""
    common = set.intersection(*(set(r.content.metric_records[METRICS_RECORD]) for r in replies))
    for reply in replies:
        metrics = reply.content.metric_records[METRICS_RECORD]
        content = RecordDict(
            {METRICS_RECORD: MetricRecord({k: metrics[k] for k in metrics if k in common})}
        )
        for key, record in reply.content.array_records.items():
            content[key] = record
        reply.content = content
    return replies


def _float32(arrays: ArrayRecord | None) -> ArrayRecord | None:
    """The aggregate as float32, the head's dtype (every valid update is float32).

    Flower 1.41's FedAdam scales its step by a numpy float64, which turns the whole global head
    into float64: sent to the sites at twice the size, and checkpointed in a dtype the resumed head
    (float32) cannot reproduce bit for bit.
    """
    if arrays is None or all(a.dtype == "float32" for a in arrays.values()):
        return arrays
    return record_from_arrays(
        {k: np.asarray(v, dtype=np.float32) for k, v in arrays_from_record(arrays).items()}
    )


def _reply_bytes(reply: Message) -> int:
    records = reply.content.array_records
    return sum(record_nbytes(record) for record in records.values())
