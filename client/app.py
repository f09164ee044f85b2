"""The site's Flower ClientApp: trains the global head on local cached embeddings, replies with weights only."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from common.config import RunSettings, SiteSettings
from common.flower import arrays_from_record, metric_record, record_from_arrays

log = logging.getLogger(__name__)

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round: load the global head, (optionally) score it locally, train, reply with the new head."""
    from client.training import run_local_round

    run, site_settings = _settings(context)
    incoming = arrays_from_record(msg.content.array_records["arrays"])
    config = _config(msg)
    outcome = run_local_round(incoming, run=run, site_settings=site_settings, config=config)
    _audit(context, msg, site_settings, outcome.arrays, outcome.metrics, message_type="train")
    content = RecordDict(
        {"arrays": record_from_arrays(outcome.arrays), "metrics": metric_record(outcome.metrics)}
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global head on the site's held-out split; reply with scalar metrics only."""
    from client.training import evaluate_locally

    run, site_settings = _settings(context)
    incoming = arrays_from_record(msg.content.array_records["arrays"])
    metrics = evaluate_locally(incoming, run=run, site_settings=site_settings)
    _audit(context, msg, site_settings, {}, metrics, message_type="evaluate")
    return Message(content=RecordDict({"metrics": metric_record(metrics)}), reply_to=msg)


def _config(msg: Message) -> dict[str, Any]:
    records = msg.content.config_records
    return dict(records["config"]) if "config" in records else {}


def _settings(context: Context) -> tuple[RunSettings, SiteSettings]:
    run = RunSettings.from_run_config(dict(context.run_config))
    site = SiteSettings.from_node_config(dict(context.node_config))
    return run, site


def _audit(
    context: Context,
    msg: Message,
    site: SiteSettings,
    arrays: Mapping[str, np.ndarray],
    metrics: Mapping[str, float | int],
    *,
    message_type: str,
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
    )
