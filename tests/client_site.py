"""A site's ClientApp inputs for in-process tests: its node config, context and initial head."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, RecordDict

from client.site import Site, load_site
from common.artifacts import state_arrays
from common.config import RunSettings, SiteSettings
from common.training import build_run_model


def in_process_node_config(root: Path, partition: int = 0) -> dict[str, Any]:
    """Partition ``partition`` of 2, cache and state under ``root``; the site trains in-process
    (tests/client/test_worker.py covers the worker)."""
    return {
        "partition-id": partition,
        "num-partitions": 2,
        "cache-dir": str(root / "cache"),
        "state-dir": str(root / "state"),
        "worker": "off",
    }


def load_client(
    run_config: dict[str, Any], node_config: dict[str, Any]
) -> tuple[Context, Site, dict[str, np.ndarray]]:
    """Loads (embeds) the site; returns the ClientApp's context, the site and the run's initial head."""
    run = RunSettings.from_run_config(run_config)
    site = load_site(SiteSettings.from_node_config(node_config), run)
    initial = state_arrays(
        build_run_model(run, dims=site.train.dims, num_classes=site.train.num_classes)
    )
    context = Context(
        run_id=1, node_id=0, node_config=node_config, state=RecordDict(), run_config=run_config
    )
    return context, site, initial
