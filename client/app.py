"""The site's Flower ClientApp: trains the global head on local cached embeddings, replies with weights only.

This module imports only flwr and numpy: Flower runs every message in a fresh process, so the heavy
work (torch, the site's embeddings) runs in the site's long-lived worker (client/worker.py) when
one can be used, and in this process otherwise.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client.clipping import clip_update_mod
from client.egress import audit_reply, declined_reply, secagg_stage
from client.identity import site_identity_mod, site_settings
from client.secagg import secagg_train
from common.config import SiteSettings
from common.flower import arrays_from_record, metric_record, record_from_arrays
from common.wire import ARRAYS_RECORD, CONFIG_RECORD, METRICS_RECORD

log = logging.getLogger(__name__)

app = ClientApp(mods=[site_identity_mod])  # names the site in train replies and errors


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round: load the global head, (optionally) score it locally, train, reply with the new head.

    Under client-level DP the server's config carries a clipping norm and the update is clipped
    (client/clipping.py) before it is audited and sent: the audit log holds exactly what leaves.
    Under secure aggregation the messages are SecAgg+ stages (client/secagg.py): the same local
    round runs in the "collect masked vectors" stage and only the masked head leaves.
    """
    handler_started = time.time()
    site = site_settings(context)
    result: dict[str, Any] = {}
    stage = secagg_stage(msg)
    if stage is not None:

        def secagg_round(incoming: dict[str, np.ndarray], config: dict[str, Any]) -> dict[str, Any]:
            result.update(_run(_request("train", incoming, config, context), site))
            return result

        reply = secagg_train(msg, context, site=site, local_round=secagg_round)
    else:

        def local_round(message: Message, ctx: Context) -> Message:
            result.update(_execute("train", message, ctx, site))
            if result.get("declined"):
                return declined_reply(message, str(result["reason"]))
            content = RecordDict(
                {
                    ARRAYS_RECORD: record_from_arrays(result["arrays"]),
                    METRICS_RECORD: metric_record(result["metrics"]),
                }
            )
            return Message(content=content, reply_to=message)

        reply = clip_update_mod(msg, context, local_round)
    privacy, timing = result.get("privacy"), _timing(handler_started)
    audit_reply(context, site, msg, reply, stage=stage, privacy=privacy, timing=timing)
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global head on the site's held-out split; reply with scalar metrics only."""
    site = site_settings(context)
    metrics = _execute("evaluate", msg, context, site)["metrics"]
    reply = Message(content=RecordDict({METRICS_RECORD: metric_record(metrics)}), reply_to=msg)
    audit_reply(context, site, msg, reply)
    return reply


@app.query()
def query(msg: Message, context: Context) -> Message:
    """A closed-form start query (server/closed_form.py): sums over the site's training rows in
    the shape of the head (client/training.py ``start_product``), audited like a train reply. A
    site that requires sample-level DP declines: the sums are not private."""
    site = site_settings(context)
    result = _execute("query", msg, context, site)
    if result.get("declined"):
        reply = declined_reply(msg, str(result["reason"]))
    else:
        content = RecordDict(
            {
                ARRAYS_RECORD: record_from_arrays(result["arrays"]),
                METRICS_RECORD: metric_record(result["metrics"]),
            }
        )
        reply = Message(content=content, reply_to=msg)
    audit_reply(context, site, msg, reply)
    return reply


def _execute(op: str, msg: Message, context: Context, site: SiteSettings) -> dict[str, Any]:
    incoming = arrays_from_record(msg.content.array_records[ARRAYS_RECORD])
    return _run(_request(op, incoming, _config(msg), context), site)


def _request(
    op: str, incoming: Mapping[str, np.ndarray], config: Mapping[str, Any], context: Context
) -> dict[str, Any]:
    """A request for client/training.py ``execute`` (here or in the site worker)."""
    return {
        "op": op,
        "incoming": dict(incoming),
        "run": dict(context.run_config),
        "site": dict(context.node_config),
        "config": dict(config),
        "run_id": int(context.run_id),
    }


def _run(request: dict[str, Any], site: SiteSettings) -> dict[str, Any]:
    if _use_worker(site):
        from client.worker import WorkerUnavailable, call_worker

        try:
            return call_worker(site.state_path, request, parent_pid=os.getppid())
        except WorkerUnavailable as exc:
            log.warning("site worker unavailable (%s); computing in the ClientApp process", exc)
    from client.training import execute

    return execute(request)


def _timing(handler_started: float) -> dict[str, float]:
    """When this message's handler and (where known) its process started: the site's audit timing."""
    timing = {"handler_started": handler_started}
    if (process_started := process_start_time()) is not None:
        timing["process_started"] = process_started
    return timing


def process_start_time() -> float | None:
    """Wall-clock time this process started (Linux /proc; None elsewhere): Flower starts one per message."""
    try:
        stat = Path("/proc/self/stat").read_text()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        ticks = float(stat.rsplit(")", 1)[1].split()[19])  # field 22: starttime, ticks after boot
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def _use_worker(site: SiteSettings) -> bool:
    """Use the site worker unless told not to, or when Flower's simulation engine (Ray) runs us:
    its actor processes already live across messages."""
    if site.worker == "auto":
        return "ray" not in sys.modules
    return site.worker == "on"


def _config(msg: Message) -> dict[str, Any]:
    records = msg.content.config_records
    return dict(records[CONFIG_RECORD]) if CONFIG_RECORD in records else {}
