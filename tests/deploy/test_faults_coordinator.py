"""A coordinator that fails with real Flower processes on 127.0.0.1: a killed ServerApp, a restarted
SuperLink. The run resumes from its last checkpoint without lost or repeated rounds.

Both tests use one federation (module fixture ``coordinated``: a SuperLink with a database and two
SuperNodes), each with its own runs and run-dir; a test that restarts the SuperLink leaves it
running on the same port and database for the next."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from common.tensorfile import read_tensorfile
from simulations.flower.flwr_cli import run_app, run_status, stop_run, submit_run
from simulations.flower.local import LocalSuperLink, LocalSuperNode
from simulations.flower.processes import descendants_running
from tests.deploy.faults import (
    RUN_TIMEOUT,
    fault_config,
    federation,
    read_history,
    setup_home,
    wait_for_rounds,
)

pytestmark = pytest.mark.slow

Federation = tuple[Path, LocalSuperLink, list[LocalSuperNode]]


@pytest.fixture(scope="module")
def coordinated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """fedembed's home, a SuperLink keeping its state in a database, and sites site-0, site-1."""
    home = tmp_path_factory.mktemp("coordinator")
    with pytest.MonkeyPatch.context() as monkeypatch:
        setup_home(monkeypatch, home)
        database = home / "flower" / "state.db"
        with federation(home, 2, database=database) as (link, nodes):
            yield home, link, nodes


def test_coordinator_killed_mid_run_resumes_without_lost_or_repeated_rounds(
    coordinated: Federation, tiny_model_dirs: dict[str, Path], fault_app: Path
) -> None:
    home, link, _ = coordinated
    run_dir = home / "run-killed-coordinator"
    assert link.process is not None
    config = fault_config(tiny_model_dirs, run_dir, {"num-server-rounds": 2})
    run_id = submit_run(fault_app, link.connection, run_config=config)
    wait_for_rounds(run_dir, 1, checkpointed=True)
    serverapps = descendants_running(link.process.pid, "flwr-serverapp")
    assert len(serverapps) == 1
    os.kill(serverapps[0], signal.SIGKILL)  # the coordinator dies during round 2
    killed_after = len(read_history(run_dir))
    assert killed_after == 1 and not (run_dir / "final").exists()
    # Flower notices the dead ServerApp only after 2 missed 30 s heartbeats, and until then the
    # SuperNodes sit on the dead run's round-2 message: the operator stops it (flwr stop), then
    # resumes at once. The killed run is never reported completed.
    stop_run(link.connection, run_id)
    assert run_status(link.connection, run_id).status == "finished:stopped"
    resumed = run_app(
        fault_app, link.connection, run_config={**config, "resume": True}, timeout=RUN_TIMEOUT
    )
    assert run_status(link.connection, run_id).status == "finished:stopped"
    assert resumed.ok, resumed.log_text[-3000:]
    assert f"resuming run from round {killed_after}" in resumed.log_text
    history = read_history(run_dir)
    assert [e["round"] for e in history] == [1, 2]
    assert all(len(e["sites"]) == 2 for e in history)
    final, _ = read_tensorfile(run_dir / "final" / "head.safetensors", key="fedembed")
    last, _ = read_tensorfile(run_dir / "checkpoints" / "round-0002.safetensors", key="meta")
    assert final.keys() == last.keys()
    for name, value in last.items():
        np.testing.assert_array_equal(final[name], value)


def test_superlink_restarted_with_its_database_sites_reconnect_and_run_resumes(
    coordinated: Federation, tiny_model_dirs: dict[str, Path], fault_app: Path
) -> None:
    home, link, nodes = coordinated
    run_dir = home / "run-restarted-superlink"
    config = fault_config(tiny_model_dirs, run_dir, {"num-server-rounds": 2})
    run_id = submit_run(fault_app, link.connection, run_config=config)
    wait_for_rounds(run_dir, 1, checkpointed=True)
    link.kill()  # the SuperLink crashes (its ServerApp with it) during round 2
    link.start()  # same port, same database; the SuperNodes are not touched
    assert all(node.running for node in nodes)
    before = run_status(link.connection, run_id)  # the run is still known after the restart
    resumed = run_app(
        fault_app, link.connection, run_config={**config, "resume": True}, timeout=RUN_TIMEOUT
    )
    assert before.run_id == run_id
    assert resumed.ok, resumed.log_text[-3000:]
    assert "resuming run from round 1" in resumed.log_text
    history = read_history(run_dir)
    assert [e["round"] for e in history] == [1, 2]
    assert history[1]["outcomes"] == {"site-0": "aggregated", "site-1": "aggregated"}
