"""Round bookkeeping: what happened to each site in a round, the run's empty-round rule, and history helpers."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Message

from common.errors import FedEmbedError
from common.wire import NUM_EXAMPLES
from server.strategy.contract import site_name

OUTCOME_KINDS = ("rejected", "declined", "failed", "dropped")  # a site's ways of not contributing


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


def round_counts(record: Mapping[str, Any]) -> str:
    """``N sites aggregated, R rejected, D declined, F failed, X dropped`` of a history record."""
    counts = ", ".join(f"{len(record.get(kind) or {})} {kind}" for kind in OUTCOME_KINDS)
    unchanged = "" if record.get("head_updated", True) else " (head unchanged)"
    return f"{len(record.get('sites') or [])} sites aggregated{unchanged}, {counts}"


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

    def shortfalls(self) -> list[str]:
        """``"<name> (node <id>) <outcome>"`` for each node that did not get its update aggregated."""
        return [
            f"{self.display(node)} {outcome}"
            for node, outcome in self.outcomes_by_node().items()
            if outcome != "aggregated"
        ]

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


def metrics_mean(
    site_metrics: Mapping[int, Mapping[str, float]], weights_key: str = NUM_EXAMPLES
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
