"""Run the fedembed Flower app on one machine: Flower's simulation engine, or real SuperLink/SuperNode processes."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import HOME_ENV
from simulations.localfed import (
    ConfigValue,
    LocalSuperLink,
    LocalSuperNode,
    RunResult,
    run_app,
)

APP_DIR = Path(__file__).resolve().parent.parent


@dataclass
class FederationResult:
    """A finished federation: Flower's verdict, where the run's files are, and its per-round history."""

    result: RunResult
    run_dir: Path
    home: Path
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.result.ok

    @property
    def final_head(self) -> Path:
        return self.run_dir / "final"


def _read_history(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "history.jsonl"
    if not path.exists():
        return []
    return [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def _with_home(out_dir: Path) -> Path:
    """Point $FEDEMBED_HOME (caches, site state) at ``out_dir`` for the processes we start."""
    home = out_dir.resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ[HOME_ENV] = str(home)
    return home


def simulate(
    *,
    out_dir: Path,
    sites: int,
    run_config: Mapping[str, ConfigValue],
    cpus_per_site: int = 1,
    timeout: float = 3600.0,
    echo: bool = True,
) -> FederationResult:
    """``sites`` virtual sites on Flower's simulation engine (our own SuperLink, stopped on exit)."""
    home = _with_home(out_dir)
    run_dir = home / "run"
    config = {
        "run-dir": str(run_dir),
        "min-sites": min(sites, int(run_config.get("min-sites", sites))),
        **run_config,
    }
    config["run-dir"] = str(run_dir)
    with LocalSuperLink(home / "flower", simulation=True) as link:
        result = run_app(
            APP_DIR,
            link.connection,
            run_config=config,
            federation_config={"num-supernodes": sites, "client-resources-num-cpus": cpus_per_site},
            timeout=timeout,
            log_dir=home / "logs",
            echo=sys.stdout if echo else None,
        )
    return FederationResult(result, run_dir, home, _read_history(run_dir))


def site_node_config(
    home: Path, index: int, sites: int, **extra: ConfigValue
) -> dict[str, ConfigValue]:
    """The ``--node-config`` of local site ``index``: its share of the data, its own state directory."""
    return {
        "partition-id": index,
        "num-partitions": sites,
        "site-name": f"site-{index}",
        "state-dir": str(home / "sites" / f"site-{index}"),
        "cache-dir": str(home / "sites" / f"site-{index}" / "cache"),
        **extra,
    }


def deploy_local(
    *,
    out_dir: Path,
    sites: int,
    run_config: Mapping[str, ConfigValue],
    timeout: float = 3600.0,
    echo: bool = True,
) -> FederationResult:
    """A real ``flower-superlink`` and ``sites`` real ``flower-supernode`` processes on 127.0.0.1."""
    home = _with_home(out_dir)
    run_dir = home / "run"
    config = {"min-sites": sites, **run_config, "run-dir": str(run_dir)}
    flower = home / "flower"
    with LocalSuperLink(flower, database=flower / "state.db") as link:
        nodes = [
            LocalSuperNode(
                link.address,
                flower,
                name=f"site-{i}",
                home=link.home,
                node_config=site_node_config(home, i, sites),
            )
            for i in range(sites)
        ]
        try:
            for node in nodes:
                node.start(wait=False)
            for node in nodes:
                node.wait_connected()
            result = run_app(
                APP_DIR,
                link.connection,
                run_config=config,
                timeout=timeout,
                log_dir=home / "logs",
                echo=sys.stdout if echo else None,
            )
        finally:
            for node in nodes:
                node.stop()
    return FederationResult(result, run_dir, home, _read_history(run_dir))


def summarize(fed: FederationResult) -> str:
    """A short human summary: verdict, rounds, per-round metrics, final head location."""
    lines = [f"Flower run {fed.result.run_id}: {fed.result.status} in {fed.result.elapsed:.0f} s"]
    for entry in fed.history:
        metrics = {**entry.get("site_metrics_mean", {}), **entry.get("server_metrics", {})}
        shown = ", ".join(f"{k}={v:.3f}" for k, v in metrics.items() if "seconds" not in k)
        lines.append(
            f"  round {entry['round']}: {len(entry.get('sites', []))} sites, "
            f"{len(entry.get('rejected', {}))} rejected, {entry.get('wall_seconds', 0):.1f} s; {shown}"
        )
    if fed.ok:
        lines.append(
            f"final head: {fed.final_head} (evaluate with: fedembed evaluate --head {fed.final_head})"
        )
    else:
        lines.append(f"log: {fed.result.log_path}")
    return "\n".join(lines)
