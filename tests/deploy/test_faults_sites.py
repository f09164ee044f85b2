"""Sites that fail with real Flower processes on 127.0.0.1: a site killed mid-round, a misbehaving
site. The run must finish and say who did what.

Two sites are enough for each fact (min-sites 2): site-0 is honest and site-1 fails, so a round
that goes on after the fault goes on with site-0 alone."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from simulations.flower.flwr_cli import run_app, run_logs, submit_run, wait_for_run
from simulations.flower.processes import descendants_running
from tests.deploy.faults import (
    KILL_ROUND_TIMEOUT,
    RUN_TIMEOUT,
    fault_config,
    federation,
    new_process,
    read_history,
    setup_home,
    wait_for_rounds,
)

pytestmark = pytest.mark.slow


def test_site_killed_mid_round_is_dropped_by_name_then_rejoins(
    tmp_path: Path,
    tiny_model_dirs: dict[str, Path],
    fault_app: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run_dir = setup_home(monkeypatch, tmp_path)
    with federation(tmp_path, 2) as (link, nodes):
        config = fault_config(
            tiny_model_dirs,
            run_dir,
            {"num-server-rounds": 3, "round-timeout": KILL_ROUND_TIMEOUT},
        )
        run_id = submit_run(fault_app, link.connection, run_config=config)
        victim = nodes[1]
        assert victim.process is not None
        wait_for_rounds(run_dir, 1)
        # Round 2 is under way: wait for site-1's ClientApp for it, then SIGKILL the SuperNode.
        done_before = set(descendants_running(victim.process.pid, "flwr-clientapp"))
        new_process(victim.process.pid, "flwr-clientapp", done_before)
        old_id = victim.node_id
        os.kill(victim.process.pid, signal.SIGKILL)
        victim.kill()  # reap it and end what Flower's parent monitors have not ended yet
        assert read_history(run_dir)[-1]["round"] == 1, "round 2 finished before the kill"
        victim.start()  # the site restarts: a new node id, the same name
        status = wait_for_run(link.connection, run_id, timeout=RUN_TIMEOUT)
        log_text = run_logs(link.connection, run_id)
    assert status.status == "finished:completed", log_text[-3000:]
    first, second, third = read_history(run_dir)
    assert first["outcomes"] == dict.fromkeys(("site-0", "site-1"), "aggregated")
    # Dropped by the round timeout, or by Flower's own "node unavailable" reply if that came first.
    assert second["outcomes"]["site-1"].startswith("dropped: ")
    assert list(second["dropped"]) == [str(old_id)]
    assert second["outcomes"]["site-0"] == "aggregated" and len(second["sites"]) == 1
    # The restarted site rejoined under a new node id and its old id was not waited for again.
    assert victim.node_id != old_id
    assert third["site_names"][str(victim.node_id)] == "site-1" and len(third["sites"]) == 2
    assert third["outcomes"] == dict.fromkeys(("site-0", "site-1"), "aggregated")
    assert str(old_id) not in third["sampled"]
    assert f"round 2: site-1 (node {old_id}) dropped: " in log_text
    assert (run_dir / "final" / "head.safetensors").exists()


def test_misbehaving_site_is_rejected_by_name_and_cannot_crash_the_coordinator(
    tmp_path: Path,
    tiny_model_dirs: dict[str, Path],
    fault_app: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run_dir = setup_home(monkeypatch, tmp_path)
    with federation(tmp_path, 2, extra={1: {"fault": "malformed"}}) as (link, _):
        config = fault_config(tiny_model_dirs, run_dir, {"num-server-rounds": 3})
        result = run_app(fault_app, link.connection, run_config=config, timeout=RUN_TIMEOUT)
    assert result.ok, result.log_text[-3000:]
    first, second, third = read_history(run_dir)
    bad = next(n for n, name in first["site_names"].items() if name == "site-1")
    # Round 1: a 16 MB array beside the head; rejected on its key, the round goes on with site-0.
    assert first["outcomes"]["site-1"].startswith("rejected: head keys differ")
    assert "unexpected ['payload']" in first["rejected"][bad]
    assert first["bytes_received"][bad] > 16_000_000
    assert first["outcomes"]["site-0"] == "aggregated" and len(first["sites"]) == 1
    # Round 2: a wrong shape and NaN values.
    assert "shape (3, 3, 3), want" in second["rejected"][bad]
    assert second["outcomes"]["site-0"] == "aggregated" and len(second["sites"]) == 1
    # Round 3: a valid head with a metric the others lack: aggregated (Flower's FedAvg alone would
    # have raised InconsistentMessageReplies and ended the run finished:failed).
    assert third["outcomes"] == {"site-0": "aggregated", "site-1": "aggregated"}
    assert len(third["sites"]) == 2
    assert third["site_metrics"][bad]["surprise"] == 1.0
    # The final evaluation's list-valued metrics from site-1 are ignored, and recorded.
    assert "not a scalar" in third["evaluate_rejected"][bad]
    assert f"round 1: site-1 (node {bad}) rejected: head keys differ" in result.log_text
