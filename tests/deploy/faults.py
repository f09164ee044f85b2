"""Shared by the fault tests (tests/deploy/test_faults_*.py): a tiny run-config, a local federation of
real Flower processes named site-0.., and readers of the run's history."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from common.config import HOME_ENV
from simulations.flower.federate import SITE_ENV, site_node_config
from simulations.flower.local import LocalSuperLink, LocalSuperNode
from simulations.flower.processes import descendants_running
from simulations.flower.run_config import ConfigValue
from tests.tiny_config import tiny_run_config

REPO = Path(__file__).resolve().parents[2]
FAULT_CLIENTAPP = Path(__file__).with_name("fault_clientapp.py")
# Seconds a round waits for its sites. A run's first round is the slowest (each site starts its
# worker and embeds its data): ~40 s with 3 sites on 2 loaded cores, ~15 s on an idle machine.
ROUND_TIMEOUT = 120.0
# A killed SuperNode costs its round this long at most (Flower itself reports the node unavailable
# after 2 missed 30 s heartbeats, whichever comes first). A site's first round (and a restarted
# site's, under its new node id) gets ROUND_TIMEOUT: run-config first-round-timeout.
KILL_ROUND_TIMEOUT = 30.0
RUN_TIMEOUT = 300.0


def fault_config(
    tiny: Mapping[str, Path], run_dir: Path, extra: Mapping[str, ConfigValue] | None = None
) -> dict[str, ConfigValue]:
    config: dict[str, ConfigValue] = tiny_run_config(
        tiny,
        **{
            "dataset-n": 90,
            "local-epochs": 1,
            "min-sites": 2,
            "round-timeout": ROUND_TIMEOUT,
            "first-round-timeout": ROUND_TIMEOUT,
            "run-dir": str(run_dir),
        },
    )
    return {**config, **(extra or {})}


@contextlib.contextmanager
def federation(
    home: Path,
    sites: int,
    *,
    extra: Mapping[int, Mapping[str, ConfigValue]] | None = None,
    database: Path | None = None,
) -> Iterator[tuple[LocalSuperLink, list[LocalSuperNode]]]:
    """A SuperLink and ``sites`` SuperNodes named site-0.. (node-config as deploy-local writes it)."""
    flower = home / "flower"
    with contextlib.ExitStack() as stack:
        link = stack.enter_context(LocalSuperLink(flower, database=database, startup_timeout=180))
        nodes = []
        for i in range(sites):
            node = LocalSuperNode(
                link.address,
                flower,
                name=f"site-{i}",
                home=link.home,
                node_config=site_node_config(home, i, sites, **(extra or {}).get(i, {})),
                startup_timeout=180,
                extra_env=SITE_ENV,
            )
            stack.callback(node.stop)
            nodes.append(node.start(wait=False))
        for node in nodes:
            node.wait_connected()
        yield link, nodes


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "history.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def wait_for_rounds(
    run_dir: Path, rounds: int, timeout: float = 180.0, *, checkpointed: bool = False
) -> None:
    """Until the history has ``rounds`` rounds (and, with ``checkpointed``, round ``rounds``'s
    checkpoint is written: the coordinator writes a round's history line first, and a resumed
    run starts from the last checkpoint)."""
    deadline = time.monotonic() + timeout
    checkpoint = run_dir / "checkpoints" / f"round-{rounds:04d}.safetensors"
    while len(read_history(run_dir)) < rounds or (checkpointed and not checkpoint.is_file()):
        assert time.monotonic() < deadline, f"round {rounds} not done after {timeout:.0f} s"
        time.sleep(0.1)


def new_process(root_pid: int, command: str, known: set[int], timeout: float = 60.0) -> int:
    """The PID of a ``command`` process under ``root_pid`` that is not in ``known``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fresh = set(descendants_running(root_pid, command)) - known
        if fresh:
            return min(fresh)
        time.sleep(0.05)
    raise AssertionError(f"no new {command} under PID {root_pid} within {timeout:.0f} s")


def setup_home(monkeypatch: pytest.MonkeyPatch, home: Path) -> Path:
    monkeypatch.setenv(HOME_ENV, str(home))  # site caches and state land in the test's directory
    return home / "run"
