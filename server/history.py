"""The run's history: one line per round in history.jsonl, written the same way by both ServerApp modes."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from server.checkpoints import RunStore
from server.strategy import RoundLog, metrics_mean, round_counts


def write_round(
    store: RunStore,
    entry: RoundLog,
    server_metrics: Mapping[str, float],
    client_dp: Mapping[str, Any] | None = None,
    *,
    extra: Mapping[str, Any] | None = None,
    note: str = "",
) -> dict[str, Any]:
    """Append the round to history.jsonl and print it, naming every site that did not contribute.

    Per-node dicts are keyed by node id (a restarted SuperNode has a new one); ``site_names`` maps
    ids to the names sites gave, and ``outcomes`` says per site name: aggregated, rejected, declined,
    failed, dropped (no reply in time / node dead) or skipped (quarantined after a drop).
    ``extra``: mode-specific fields (e.g. ``secure_aggregation``); ``note`` follows the counts.
    """
    wall = time.time() - entry.started
    record: dict[str, Any] = {
        "round": entry.round,
        "started": entry.started,
        "wall_seconds": round(wall, 3),
        "sites": entry.sites,
        "sampled": entry.sampled,
        "site_names": entry.names,
        "outcomes": entry.outcomes(),
        "bytes_received": entry.bytes_received,
        "bytes_sent": entry.bytes_sent,
        "rejected": entry.rejected,
        "failed": entry.failed,
        "declined": entry.declined,
        "dropped": entry.dropped,
        "skipped": entry.skipped,
        "evaluate_rejected": entry.evaluate_rejected,
        "head_updated": entry.head_updated,
        "site_metrics": entry.site_metrics,
        "site_metrics_mean": metrics_mean(entry.site_metrics),
        "server_metrics": dict(server_metrics),
        "site_timing": {n: {k: round(v, 3) for k, v in t.items()} for n, t in entry.timing.items()},
        **dict(extra or {}),
        "time": time.time(),
    }
    if client_dp is not None:
        record["client_dp"] = dict(client_dp)
    store.append_history(record)
    shown = ", ".join(
        f"{k}={v:.3f}"
        for k, v in {**record["site_metrics_mean"], **server_metrics}.items()
        if "seconds" not in k
    )
    if client_dp is not None:
        shown += (
            f"; client-level DP: epsilon={client_dp['epsilon']:.4g} at delta={client_dp['delta']:g}"
            f"{'' if client_dp['released'] else ' (nothing released this round)'}"
        )
    print(
        f"[fedembed] round {entry.round}: {round_counts(record)}{note}, "
        f"{sum(entry.bytes_received.values())} B in, {wall:.1f} s; {shown}",
        flush=True,
    )
    for line in entry.shortfalls():
        print(f"[fedembed] round {entry.round}: {line}", flush=True)
    return record
