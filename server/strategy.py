"""Flower strategies for fedembed: Flower's own aggregation, plus update validation and per-round accounting.

Every reply is classified per site before anything is aggregated:

- aggregated: a valid update that went into the global head;
- rejected: the reply broke the update contract (keys, shapes, dtypes, finite values, norm bound,
  records, metrics) and was dropped without being decoded further than needed;
- declined: the site said no (error code 4001, e.g. its privacy budget is spent);
- failed: the site's ClientApp raised (an error reply from the site);
- dropped: no reply within the round timeout, or Flower reports the node unavailable (dead).

A round in which nothing reaches the global head counts against run-config ``max-empty-rounds``
(``EmptyRounds``): one too many in a row raises EmptyRoundError, naming each site's outcome, and
the ServerApp fails the run (no final head).

Sites name themselves (client/identity.py): a ``site`` ConfigRecord ``{"name": ...}`` beside the
update, and a ``[site NAME]`` prefix on error reasons. Node ids change when a SuperNode restarts;
names do not, so history and logs show both.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

from common.config import RunSettings
from common.errors import FedEmbedError
from common.flower import arrays_from_record, record_nbytes
from server.grid import DelegatingGrid

log = logging.getLogger(__name__)

BASES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedavgm": FedAvgM,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
}

DECLINED_ERROR_CODE = 4001  # client/app.py's code for "the site declined this round"
NODE_UNAVAILABLE_CODE = 5  # flwr.common.constant.ErrorCode.NODE_UNAVAILABLE (dead SuperNode)
SUPERLINK_NODE_ID = 1  # replies Flower makes up for an unreachable node come from the SuperLink
SITE_RECORD = "site"  # the optional ConfigRecord naming the site: {"name": "<site name>"}
SITE_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_SITE_NAME = re.compile(SITE_NAME_PATTERN)
_SITE_PREFIX = re.compile(r"\[site (" + SITE_NAME_PATTERN + r")\] ")
MAX_METRICS = 64  # scalar metrics a reply may carry
NPY_HEADER_SLACK = 4096  # bytes an array's serialized form may exceed its raw data by
MAX_REASON = 300  # characters of a site's error text kept in history and logs


def site_name(reply: Message) -> str | None:
    """The name the site gave in this reply (record or error prefix), if well formed."""
    if reply.has_error():
        found = _SITE_PREFIX.match(str(reply.error.reason))
        return found.group(1) if found else None
    if SITE_RECORD not in reply.content.config_records:
        return None
    record = reply.content.config_records[SITE_RECORD]
    name = record.get("name") if set(record) == {"name"} else None
    return name if isinstance(name, str) and _SITE_NAME.fullmatch(name) else None


def _short(text: str) -> str:
    text = _SITE_PREFIX.sub("", str(text), count=1).replace("\n", " ")
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def classify_error(reply: Message) -> tuple[str, str]:
    """An error reply's outcome (declined, dropped or failed) and its reason, shortened."""
    code, reason = int(reply.error.code), _short(str(reply.error.reason))
    if code == DECLINED_ERROR_CODE:
        return "declined", reason
    if code == NODE_UNAVAILABLE_CODE or reply.metadata.src_node_id == SUPERLINK_NODE_ID:
        return "dropped", f"node unavailable: {reason}"
    return "failed", reason


class RunFailed(FedEmbedError):
    """The federation cannot give a trained head: the ServerApp raises it, Flower marks the run
    ``finished:failed`` and no final head is exported."""


class EmptyRoundError(RunFailed):
    """A round added no site's update to the global head, one more in a row than max-empty-rounds."""

    def __init__(
        self, server_round: int, reasons: Sequence[str], *, streak: int, allowed: int
    ) -> None:
        self.server_round = server_round
        super().__init__(
            f"round {server_round}: no site's update was aggregated, {streak} round(s) in a row "
            f"(max-empty-rounds = {allowed}); the run stops: "
            + ("; ".join(reasons) or "no site was sampled")
        )


@dataclass
class EmptyRounds:
    """The run-config's rule for rounds whose aggregate leaves the global head unchanged."""

    allowed: int
    streak: int = 0

    def record(self, server_round: int, *, updated: bool, reasons: Sequence[str]) -> None:
        """Count the round; raise EmptyRoundError when more than ``allowed`` follow each other.

        ``reasons``: each site that did not contribute and why (``"<site> failed: <error>"``).
        """
        if updated:
            self.streak = 0
            return
        self.streak += 1
        if self.streak > self.allowed:
            raise EmptyRoundError(server_round, reasons, streak=self.streak, allowed=self.allowed)


def require_trained(history: Iterable[Mapping[str, Any]]) -> None:
    """Raise RunFailed unless some round of the run's history changed the global head."""
    entries = list(history)
    if not any(entry.get("head_updated", bool(entry.get("sites"))) for entry in entries):
        raise RunFailed(
            f"none of the run's {len(entries)} round(s) aggregated a site's update: the head "
            "never trained, so no final head is exported"
        )


OUTCOME_KINDS = ("rejected", "declined", "failed", "dropped")  # a site's ways of not contributing


def round_counts(record: Mapping[str, Any]) -> str:
    """``N sites aggregated, R rejected, D declined, F failed, X dropped`` of a history record."""
    counts = ", ".join(f"{len(record.get(kind) or {})} {kind}" for kind in OUTCOME_KINDS)
    unchanged = "" if record.get("head_updated", True) else " (head unchanged)"
    return f"{len(record.get('sites') or [])} sites aggregated{unchanged}, {counts}"


@dataclass
class UpdateCheck:
    """The server's contract for a site's update: the head's exact keys, shapes, float32, finite, bounded."""

    shapes: dict[str, tuple[int, ...]]
    max_update_norm: float

    def problems(self, reply: Message, global_arrays: Mapping[str, np.ndarray] | None) -> list[str]:
        """Why this reply must not be aggregated (empty when it is valid).

        Sizes, shapes and dtypes are checked on the arrays' descriptions before any is decoded,
        so an oversized or malformed payload costs no more than its transfer.
        """
        if reply.has_error():
            return [f"site error: {_short(str(reply.error.reason))}"]
        try:
            return self._problems(reply.content, global_arrays)
        except Exception as exc:  # a malformed payload must never take the coordinator down
            return [f"undecodable update: {type(exc).__name__}: {_short(str(exc))}"]

    def _problems(
        self, content: RecordDict, global_arrays: Mapping[str, np.ndarray] | None
    ) -> list[str]:
        if set(content.array_records) != {"arrays"} or set(content.metric_records) != {"metrics"}:
            return [
                f"unexpected records {sorted(content.keys())[:5]} (want 'arrays' and 'metrics')"
            ]
        if set(content.config_records) - {SITE_RECORD}:
            return [f"unexpected config records {sorted(content.config_records)[:5]}"]
        if SITE_RECORD in content.config_records:
            site = content.config_records[SITE_RECORD]
            name = site.get("name") if set(site) == {"name"} else None
            if not (isinstance(name, str) and _SITE_NAME.fullmatch(name)):
                return [f"the '{SITE_RECORD}' record must be exactly {{'name': <site name>}}"]
        record = content.array_records["arrays"]
        if set(record) != set(self.shapes):
            missing = sorted(set(self.shapes) - set(record))
            extra = sorted(set(record) - set(self.shapes))
            return [f"head keys differ (missing {missing[:3]}, unexpected {extra[:3]})"]
        if list(record) != list(self.shapes):  # Flower's DP clipping pairs arrays by position
            return ["head keys are in another order than the global head's"]
        issues = [issue for name in self.shapes if (issue := self._describe(name, record[name]))]
        if issues:
            return issues
        arrays = arrays_from_record(record)
        for name, value in arrays.items():
            if value.dtype != np.float32 or tuple(value.shape) != self.shapes[name]:
                issues.append(f"{name}: payload holds {value.dtype} {tuple(value.shape)}")
            elif not np.isfinite(value).all():
                issues.append(f"{name}: NaN or inf values")
        if issues:
            return issues
        metric_issue = metric_problem(content.metric_records["metrics"])
        if metric_issue:
            return [metric_issue]
        if global_arrays is not None:
            norm = float(
                np.sqrt(sum(float(((arrays[k] - global_arrays[k]) ** 2).sum()) for k in arrays))
            )
            if norm > self.max_update_norm:
                return [f"update norm {norm:.3g} exceeds the bound {self.max_update_norm:.3g}"]
        return []

    def _describe(self, name: str, array: Any) -> str | None:
        """What is wrong with one array's declared dtype, shape and size (None if nothing)."""
        shape = tuple(int(d) for d in array.shape)
        if str(array.dtype) != "float32":
            return f"{name}: dtype {array.dtype}, want float32"
        if shape != self.shapes[name]:
            return f"{name}: shape {shape}, want {self.shapes[name]}"
        limit = 4 * math.prod(self.shapes[name]) + NPY_HEADER_SLACK
        if len(array.data) > limit:
            return f"{name}: {len(array.data)} bytes for a {shape} float32 array"
        return None


def metric_problem(metrics: MetricRecord) -> str | None:
    """Why a reply's metrics are unusable: too many, not finite scalars, or no positive num-examples."""
    if len(metrics) > MAX_METRICS:
        return f"{len(metrics)} metrics (at most {MAX_METRICS})"
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"metric '{key[:40]}' is not a scalar"
        if not math.isfinite(value):
            return f"metric '{key[:40]}' is not finite"
    examples = metrics.get("num-examples")
    if not isinstance(examples, (int, float)) or not examples > 0:
        return f"num-examples is {examples!r}, want a positive number"
    return None


@dataclass
class RoundLog:
    """What happened in one round, as written to the run's history (all dicts keyed by node id)."""

    round: int
    started: float
    sampled: list[int] = field(default_factory=list)
    sites: list[int] = field(default_factory=list)
    names: dict[int, str] = field(default_factory=dict)
    bytes_received: dict[int, int] = field(default_factory=dict)
    bytes_sent: dict[int, int] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    declined: dict[int, str] = field(default_factory=dict)
    dropped: dict[int, str] = field(default_factory=dict)
    skipped: dict[int, str] = field(default_factory=dict)
    evaluate_rejected: dict[int, str] = field(default_factory=dict)
    site_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    head_updated: bool = False  # the round's aggregate replaced the global head
    # Seconds after ``started``: per node, when the site created its reply ("replied", the site's
    # clock) and when the ServerApp pulled it ("received").
    timing: dict[int, dict[str, float]] = field(default_factory=dict)

    def label(self, node: int) -> str:
        """The site's name when known, else ``node <id>``."""
        return self.names.get(node) or f"node {node}"

    def display(self, node: int) -> str:
        """``name (node id)`` for logs."""
        name = self.names.get(node)
        return f"{name} (node {node})" if name else f"node {node}"

    def _outcome_kinds(self) -> dict[int, tuple[int, str]]:
        """Each node's (rank, outcome): the lower the rank, the further the node got this round."""
        result = {n: (0, "aggregated") for n in self.sites}
        for rank, kind, entries in (
            (1, "rejected", self.rejected),
            (1, "declined", self.declined),
            (1, "failed", self.failed),
            (2, "dropped", self.dropped),
            (3, "skipped", self.skipped),
        ):
            for node, reason in entries.items():
                result[node] = (rank, f"{kind}: {reason}")
        return result

    def outcomes_by_node(self) -> dict[int, str]:
        """Each node's outcome: aggregated, or ``rejected|declined|failed|dropped|skipped: reason``."""
        return {node: outcome for node, (_, outcome) in self._outcome_kinds().items()}

    def outcomes(self) -> dict[str, str]:
        """The same, keyed by site name (``node <id>`` for a site that never named itself).

        A restarted site has a new node id and the same name; while its old id is still listed
        (dropped or skipped), the site's outcome is that of the node that got furthest.
        """
        best: dict[str, tuple[int, str]] = {}
        for node, ranked in self._outcome_kinds().items():
            name = self.label(node)
            if name not in best or ranked[0] < best[name][0]:
                best[name] = ranked
        return {name: outcome for name, (_, outcome) in best.items()}


class Accounting:
    """Per-round bookkeeping shared by the strategy wrapper and the ServerApp.

    ``names`` maps node ids to site names for the whole run (a restarted site has a new node id
    and the same name); ``quarantine`` holds nodes that missed a deadline, with the SuperLink's
    ``online_until`` for them at that moment: they are not sampled again until a heartbeat moves
    it (a dead SuperNode never does), so a crashed site costs one round timeout, not one per round.
    """

    def __init__(self) -> None:
        self.rounds: dict[int, RoundLog] = {}
        self.global_arrays: dict[str, np.ndarray] | None = None
        self.names: dict[int, str] = {}
        self.quarantine: dict[int, float] = {}

    def current(self, server_round: int) -> RoundLog:
        if server_round not in self.rounds:
            self.rounds[server_round] = RoundLog(round=server_round, started=time.time())
        return self.rounds[server_round]

    def learn_name(self, node: int, reply: Message) -> None:
        name = site_name(reply)
        if name is not None:
            self.names[node] = name


def build_strategy(
    run: RunSettings,
    *,
    check: UpdateCheck,
    accounting: Accounting,
    round_offset: int = 0,
    aggregator: Strategy | None = None,
) -> Strategy:
    """Flower's strategy named by ``run.strategy``, wrapped to validate, account and skip evaluation.

    ``aggregator`` replaces that strategy (server/privacy.py passes Flower's client-level DP wrapper
    around FedAvg): every reply is still validated here first, and only valid ones reach it.
    """
    inner = aggregator if aggregator is not None else BASES[run.strategy](**strategy_kwargs(run))
    return FedEmbedStrategy(
        inner,
        check=check,
        accounting=accounting,
        round_offset=round_offset,
        evaluate_every=run.eval_every,
        last_round=run.num_server_rounds,
        min_available=run.min_sites,
        empty_rounds=EmptyRounds(run.max_empty_rounds),
    )


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

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.accounting.global_arrays = arrays_from_record(arrays)
        config["round-offset"] = self.round_offset
        entry = self.accounting.current(server_round + self.round_offset)
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
        entry = self.accounting.current(server_round + self.round_offset)
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
                for k, v in reply.content.metric_records["metrics"].items()
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
        entry.head_updated = arrays is not None
        if not entry.head_updated:
            log.warning("round %d: nothing aggregated; the global head is unchanged", entry.round)
        reasons = [] if entry.head_updated else self._not_aggregated(entry, len(accepted))
        self.empty_rounds.record(entry.round, updated=entry.head_updated, reasons=reasons)
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        absolute = server_round + self.round_offset
        due = absolute == self.last_round or (
            self.evaluate_every > 0 and absolute % self.evaluate_every == 0
        )
        if not due:
            return []
        config["round-offset"] = self.round_offset
        view = self._sampling_view(grid, None)
        return self.inner.configure_evaluate(server_round, arrays, config, view)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Aggregate the valid evaluate replies (finite scalar metrics, positive num-examples)."""
        entry = self.accounting.current(server_round + self.round_offset)
        valid = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                problem: str | None = f"site error: {_short(str(reply.error.reason))}"
            elif (
                set(reply.content.keys()) - {SITE_RECORD} != {"metrics"}
                or "metrics" not in reply.content.metric_records
            ):
                problem = f"unexpected records {sorted(reply.content.keys())[:5]}"
            else:
                problem = metric_problem(reply.content.metric_records["metrics"])
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
        reasons = [
            f"{entry.display(node)} {outcome}"
            for node, outcome in entry.outcomes_by_node().items()
            if outcome != "aggregated"
        ]
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
    common = set.intersection(*(set(r.content.metric_records["metrics"]) for r in replies))
    for reply in replies:
        metrics = reply.content.metric_records["metrics"]
        content = RecordDict(
            {"metrics": MetricRecord({k: metrics[k] for k in metrics if k in common})}
        )
        for key, record in reply.content.array_records.items():
            content[key] = record
        reply.content = content
    return replies


def strategy_kwargs(run: RunSettings) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "fraction_train": run.fraction_train,
        "fraction_evaluate": 1.0,
        "min_train_nodes": run.min_sites,
        "min_evaluate_nodes": run.min_sites,
        "min_available_nodes": run.min_sites,
        "weighted_by_key": "num-examples",
    }
    if run.strategy == "fedprox":
        kwargs["proximal_mu"] = run.proximal_mu
    elif run.strategy == "fedavgm":
        kwargs["server_momentum"] = run.server_momentum
    elif run.strategy in ("fedadam", "fedyogi"):
        kwargs["eta"] = run.server_lr
    elif run.strategy == "fedtrimmedavg":
        kwargs["beta"] = run.trim_beta
    elif run.strategy == "krum":
        kwargs["num_malicious_nodes"] = max(0, (run.min_sites - 3) // 2)
    return kwargs


def _reply_bytes(reply: Message) -> int:
    records = reply.content.array_records
    return sum(record_nbytes(record) for record in records.values())


def metrics_mean(
    site_metrics: Mapping[int, Mapping[str, float]], weights_key: str = "num-examples"
) -> dict[str, float]:
    """Example-weighted mean of each metric over sites."""
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    for metrics in site_metrics.values():
        weight = float(metrics.get(weights_key, 1.0))
        for key, value in metrics.items():
            if key == weights_key:
                continue
            totals[key] = totals.get(key, 0.0) + weight * value
            weights[key] = weights.get(key, 0.0) + weight
    return {k: totals[k] / weights[k] for k in totals if weights[k] > 0}
