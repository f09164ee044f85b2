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
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from client.clipping import clip_update_mod, requested_clipping_norm
from client.identity import site_identity_mod, site_settings
from client.secagg import is_secagg_message, secagg_train
from common.config import SiteSettings
from common.flower import arrays_from_record, metric_record, record_from_arrays

log = logging.getLogger(__name__)

DECLINED_ERROR_CODE = 4001  # a site declined the round (privacy budget); not a failure of the site

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
    if is_secagg_message(msg):
        return secagg_train(
            msg,
            context,
            site=site,
            local_round=lambda incoming, config: _run(
                _request("train", incoming, config, context), site
            ),
            declined_code=DECLINED_ERROR_CODE,
            timing=_timing(handler_started),
        )
    result: dict[str, Any] = {}

    def local_round(message: Message, ctx: Context) -> Message:
        result.update(_execute("train", message, ctx, site))
        if result.get("declined"):
            return Message(
                Error(code=DECLINED_ERROR_CODE, reason=f"site declined: {result['reason']}"),
                reply_to=message,
            )
        arrays, metrics = result["arrays"], result["metrics"]
        content = RecordDict(
            {"arrays": record_from_arrays(arrays), "metrics": metric_record(metrics)}
        )
        return Message(content=content, reply_to=message)

    reply = clip_update_mod(msg, context, local_round)
    privacy = dict(result.get("privacy") or {})
    if result.get("declined"):
        _audit(context, msg, site, {}, {}, message_type="train", declined=True, privacy=privacy)
    elif not reply.has_error():
        norm = requested_clipping_norm(msg)
        if norm is not None:
            privacy["client-dp-clipping-norm"] = norm
        sent = arrays_from_record(reply.content.array_records["arrays"])
        _audit(
            context,
            msg,
            site,
            sent,
            result["metrics"],
            message_type="train",
            privacy=privacy,
            timing=_timing(handler_started),
        )
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global head on the site's held-out split; reply with scalar metrics only."""
    site = site_settings(context)
    metrics = _execute("evaluate", msg, context, site)["metrics"]
    _audit(context, msg, site, {}, metrics, message_type="evaluate")
    return Message(content=RecordDict({"metrics": metric_record(metrics)}), reply_to=msg)


def _execute(op: str, msg: Message, context: Context, site: SiteSettings) -> dict[str, Any]:
    incoming = arrays_from_record(msg.content.array_records["arrays"])
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
        from client.worker import WorkerFailed, WorkerUnavailable, call_worker

        try:
            return call_worker(site.state_path, request, parent_pid=os.getppid())
        except WorkerFailed as exc:
            raise RuntimeError(f"{exc.kind}: {exc.message}") from None
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
    return dict(records["config"]) if "config" in records else {}


def _audit(
    context: Context,
    msg: Message,
    site: SiteSettings,
    arrays: Mapping[str, np.ndarray],
    metrics: Mapping[str, float | int],
    *,
    message_type: str,
    declined: bool = False,
    privacy: Mapping[str, Any] | None = None,
    timing: Mapping[str, float] | None = None,
) -> None:
    from client.audit import record_egress

    config = _config(msg)
    server_round = int(config.get("server-round", 0)) + int(config.get("round-offset", 0))
    record_egress(
        site.state_path,
        run_id=context.run_id,
        server_round=server_round,
        message_type=message_type,
        site=site.name,
        arrays=arrays,
        metrics=metrics,
        declined=declined,
        privacy=privacy,
        timing=timing,
    )
