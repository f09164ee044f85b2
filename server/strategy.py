"""Flower strategies for fedembed: Flower's own aggregation, plus update validation and per-round accounting."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

from common.config import RunSettings
from common.flower import arrays_from_record, record_nbytes

log = logging.getLogger(__name__)

BASES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
}


@dataclass
class UpdateCheck:
    """The server's contract for a site's update: the head's exact keys, shapes, float32, finite, bounded."""

    shapes: dict[str, tuple[int, ...]]
    max_update_norm: float

    def problems(self, reply: Message, global_arrays: Mapping[str, np.ndarray] | None) -> list[str]:
        """Why this reply must not be aggregated (empty when it is valid)."""
        if reply.has_error():
            return [f"site error: {reply.error.reason}"]
        content = reply.content
        if set(content.array_records) != {"arrays"} or set(content.metric_records) != {"metrics"}:
            return [f"unexpected records {sorted(content.keys())} (want 'arrays' and 'metrics')"]
        if content.config_records:
            return ["train replies must not carry config records"]
        record = content.array_records["arrays"]
        if set(record) != set(self.shapes):
            missing, extra = (
                sorted(set(self.shapes) - set(record)),
                sorted(set(record) - set(self.shapes)),
            )
            return [f"head keys differ (missing {missing[:3]}, unexpected {extra[:3]})"]
        if list(record) != list(self.shapes):  # Flower's DP clipping pairs arrays by position
            return ["head keys are in another order than the global head's"]
        issues: list[str] = []
        arrays = arrays_from_record(record)
        for name, value in arrays.items():
            if value.dtype != np.float32:
                issues.append(f"{name}: dtype {value.dtype}, want float32")
            elif tuple(value.shape) != self.shapes[name]:
                issues.append(f"{name}: shape {tuple(value.shape)}, want {self.shapes[name]}")
            elif not np.isfinite(value).all():
                issues.append(f"{name}: NaN or inf values")
        if issues:
            return issues
        examples = content.metric_records["metrics"].get("num-examples")
        if not isinstance(examples, (int, float)) or not examples > 0 or not np.isfinite(examples):
            return [f"num-examples is {examples!r}, want a positive number"]
        if global_arrays is not None:
            norm = float(
                np.sqrt(sum(float(((arrays[k] - global_arrays[k]) ** 2).sum()) for k in arrays))
            )
            if norm > self.max_update_norm:
                return [f"update norm {norm:.3g} exceeds the bound {self.max_update_norm:.3g}"]
        return []


@dataclass
class RoundLog:
    """What happened in one round, as written to the run's history."""

    round: int
    started: float
    sites: list[int] = field(default_factory=list)
    bytes_received: dict[int, int] = field(default_factory=dict)
    bytes_sent: dict[int, int] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    site_metrics: dict[int, dict[str, float]] = field(default_factory=dict)


class Accounting:
    """Per-round bookkeeping shared by the strategy wrapper and the ServerApp."""

    def __init__(self) -> None:
        self.rounds: dict[int, RoundLog] = {}
        self.global_arrays: dict[str, np.ndarray] | None = None

    def current(self, server_round: int) -> RoundLog:
        if server_round not in self.rounds:
            self.rounds[server_round] = RoundLog(round=server_round, started=time.time())
        return self.rounds[server_round]


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
    )


class FedEmbedStrategy(Strategy):
    """Flower strategy ``inner`` with update validation, byte accounting and sparse federated evaluation."""

    def __init__(
        self,
        inner: Strategy,
        *,
        check: UpdateCheck,
        accounting: Accounting,
        round_offset: int,
        evaluate_every: int,
        last_round: int,
    ) -> None:
        self.inner = inner
        self.check = check
        self.accounting = accounting
        self.round_offset = round_offset
        self.evaluate_every = evaluate_every
        self.last_round = last_round
        self._sent: list[Message] = []

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.accounting.global_arrays = arrays_from_record(arrays)
        config["round-offset"] = self.round_offset
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self._sent = messages  # the Grid fills in their message ids when it pushes them
        entry = self.accounting.current(server_round + self.round_offset)
        entry.bytes_sent = {m.metadata.dst_node_id: record_nbytes(arrays) for m in messages}
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        entry = self.accounting.current(server_round + self.round_offset)
        # A SuperLink-generated error (dead node) comes from node 1: map replies to their target.
        target = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent}
        accepted = []
        for reply in replies:
            node = target.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if reply.has_error():
                entry.failed[node] = str(reply.error.reason)
                log.warning("round %d: site %d failed: %s", entry.round, node, reply.error.reason)
                continue
            entry.bytes_received[node] = _reply_bytes(reply)
            issues = self.check.problems(reply, self.accounting.global_arrays)
            if issues:
                entry.rejected[node] = "; ".join(issues)
                log.warning(
                    "round %d: rejected update from site %d: %s",
                    entry.round,
                    node,
                    entry.rejected[node],
                )
                continue
            accepted.append(reply)
            entry.sites.append(node)
            entry.site_metrics[node] = {
                k: float(v)
                for k, v in reply.content.metric_records["metrics"].items()
                if isinstance(v, (int, float))
            }
        if not accepted:
            log.warning("round %d: no valid update; the global head is unchanged", entry.round)
            return None, None
        return self.inner.aggregate_train(server_round, accepted)

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
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)


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
