"""Faults with real Flower processes on 127.0.0.1: killed sites and coordinators, a restarted SuperLink,
misbehaving and poisoned sites, a site over its privacy budget. The run must finish and say who did what."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomli
import tomli_w

from client.audit import audit_path
from common.config import HOME_ENV
from common.tensorfile import read_tensorfile
from simulations.flower.federate import SITE_ENV, site_node_config
from simulations.flower.flwr_cli import run_app, run_logs, run_status, submit_run, wait_for_run
from simulations.flower.processes import LocalSuperLink, LocalSuperNode, descendants_running
from simulations.flower.run_config import ConfigValue
from tests.tiny_config import tiny_run_config

pytestmark = pytest.mark.slow

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


@pytest.fixture(scope="module")
def fault_app(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Flower app dir: fedembed's ServerApp and run-config, ClientApp tests/deploy/fault_clientapp.py.

    It holds only pyproject.toml, LICENSE and that module: the ServerApp and the ClientApp import
    server/, client/ and common/ from the installed fedembed, and `flwr run` packs it in no time.
    """
    root = tmp_path_factory.mktemp("fault-app")
    project = tomli.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    flwr = project["tool"]["flwr"]
    flwr["app"]["components"]["clientapp"] = "fault_clientapp:app"
    flwr["app"].pop("fab-include", None)  # fedembed's patterns name its own packages
    meta = project["project"]
    pyproject = {
        "build-system": project["build-system"],
        "project": {
            "name": "fedembed-faults",
            "version": meta["version"],
            "license": meta["license"],
            "dependencies": meta["dependencies"],
        },
        "tool": {"flwr": flwr},
    }
    (root / "pyproject.toml").write_text(tomli_w.dumps(pyproject), encoding="utf-8")
    shutil.copy(REPO / "LICENSE", root / "LICENSE")
    shutil.copy(FAULT_CLIENTAPP, root / "fault_clientapp.py")
    return root


def _config(
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
def _federation(
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


def _history(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "history.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _wait_for_rounds(run_dir: Path, rounds: int, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while len(_history(run_dir)) < rounds:
        assert time.monotonic() < deadline, f"round {rounds} not done after {timeout:.0f} s"
        time.sleep(0.1)


def _new_process(root_pid: int, command: str, known: set[int], timeout: float = 60.0) -> int:
    """The PID of a ``command`` process under ``root_pid`` that is not in ``known``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fresh = set(descendants_running(root_pid, command)) - known
        if fresh:
            return min(fresh)
        time.sleep(0.05)
    raise AssertionError(f"no new {command} under PID {root_pid} within {timeout:.0f} s")


def _setup(monkeypatch: pytest.MonkeyPatch, home: Path) -> Path:
    monkeypatch.setenv(HOME_ENV, str(home))  # site caches and state land in the test's directory
    return home / "run"


def test_site_killed_mid_round_is_dropped_by_name_then_rejoins(
    tmp_path: Path,
    tiny_model_dirs: dict[str, Path],
    fault_app: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run_dir = _setup(monkeypatch, tmp_path)
    with _federation(tmp_path, 3) as (link, nodes):
        config = _config(
            tiny_model_dirs,
            run_dir,
            {"num-server-rounds": 3, "round-timeout": KILL_ROUND_TIMEOUT},
        )
        run_id = submit_run(fault_app, link.connection, run_config=config)
        victim = nodes[2]
        assert victim.process is not None
        _wait_for_rounds(run_dir, 1)
        # Round 2 is under way: wait for site-2's ClientApp for it, then SIGKILL the SuperNode.
        done_before = set(descendants_running(victim.process.pid, "flwr-clientapp"))
        _new_process(victim.process.pid, "flwr-clientapp", done_before)
        old_id = victim.node_id
        os.kill(victim.process.pid, signal.SIGKILL)
        victim.kill()  # reap it and end what Flower's parent monitors have not ended yet
        assert _history(run_dir)[-1]["round"] == 1, "round 2 finished before the kill"
        victim.start()  # the site restarts: a new node id, the same name
        status = wait_for_run(link.connection, run_id, timeout=RUN_TIMEOUT)
        log_text = run_logs(link.connection, run_id)
    assert status.status == "finished:completed", log_text[-3000:]
    first, second, third = _history(run_dir)
    assert first["outcomes"] == dict.fromkeys(("site-0", "site-1", "site-2"), "aggregated")
    # Dropped by the round timeout, or by Flower's own "node unavailable" reply if that came first.
    assert second["outcomes"]["site-2"].startswith("dropped: ")
    assert list(second["dropped"]) == [str(old_id)]
    assert (
        sorted(second["outcomes"].values()).count("aggregated") == 2 and len(second["sites"]) == 2
    )
    # The restarted site rejoined under a new node id and its old id was not waited for again.
    assert victim.node_id != old_id
    assert third["site_names"][str(victim.node_id)] == "site-2" and len(third["sites"]) == 3
    assert third["outcomes"] == dict.fromkeys(("site-0", "site-1", "site-2"), "aggregated")
    assert str(old_id) not in third["sampled"]
    assert f"round 2: site-2 (node {old_id}) dropped: " in log_text
    assert (run_dir / "final" / "head.safetensors").exists()


def test_coordinator_killed_mid_run_resumes_without_lost_or_repeated_rounds(
    tmp_path: Path,
    tiny_model_dirs: dict[str, Path],
    fault_app: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run_dir = _setup(monkeypatch, tmp_path)
    with _federation(tmp_path, 2) as (link, _):
        assert link.process is not None
        config = _config(tiny_model_dirs, run_dir, {"num-server-rounds": 3})
        run_id = submit_run(fault_app, link.connection, run_config=config)
        _wait_for_rounds(run_dir, 1)
        serverapps = descendants_running(link.process.pid, "flwr-serverapp")
        assert len(serverapps) == 1
        os.kill(serverapps[0], signal.SIGKILL)  # the coordinator dies during round 2
        killed_after = len(_history(run_dir))
        assert killed_after == 1 and not (run_dir / "final").exists()
        first_status = wait_for_run(link.connection, run_id, timeout=60)
        resumed = run_app(
            fault_app, link.connection, run_config={**config, "resume": True}, timeout=RUN_TIMEOUT
        )
    assert first_status.status.startswith("finished:") and first_status.status != (
        "finished:completed"
    )
    assert resumed.ok, resumed.log_text[-3000:]
    assert f"resuming run from round {killed_after}" in resumed.log_text
    history = _history(run_dir)
    assert [e["round"] for e in history] == [1, 2, 3]
    assert all(len(e["sites"]) == 2 for e in history)
    final, _ = read_tensorfile(run_dir / "final" / "head.safetensors", key="fedembed")
    last, _ = read_tensorfile(run_dir / "checkpoints" / "round-0003.safetensors", key="meta")
    assert final.keys() == last.keys()
    for name, value in last.items():
        np.testing.assert_array_equal(final[name], value)


def test_superlink_restarted_with_its_database_sites_reconnect_and_run_resumes(
    tmp_path: Path,
    tiny_model_dirs: dict[str, Path],
    fault_app: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run_dir = _setup(monkeypatch, tmp_path)
    database = tmp_path / "flower" / "state.db"
    with _federation(tmp_path, 2, database=database) as (link, nodes):
        config = _config(tiny_model_dirs, run_dir, {"num-server-rounds": 2})
        run_id = submit_run(fault_app, link.connection, run_config=config)
        _wait_for_rounds(run_dir, 1)
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
    history = _history(run_dir)
    assert [e["round"] for e in history] == [1, 2]
    assert history[1]["outcomes"] == {"site-0": "aggregated", "site-1": "aggregated"}


def test_misbehaving_site_is_rejected_by_name_and_cannot_crash_the_coordinator(
    tmp_path: Path,
    tiny_model_dirs: dict[str, Path],
    fault_app: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run_dir = _setup(monkeypatch, tmp_path)
    with _federation(tmp_path, 3, extra={2: {"fault": "malformed"}}) as (link, _):
        config = _config(tiny_model_dirs, run_dir, {"num-server-rounds": 3})
        result = run_app(fault_app, link.connection, run_config=config, timeout=RUN_TIMEOUT)
    assert result.ok, result.log_text[-3000:]
    first, second, third = _history(run_dir)
    bad = next(n for n, name in first["site_names"].items() if name == "site-2")
    # Round 1: a 16 MB array beside the head; rejected on its key, the round goes on.
    assert first["outcomes"]["site-2"].startswith("rejected: head keys differ")
    assert "unexpected ['payload']" in first["rejected"][bad]
    assert first["bytes_received"][bad] > 16_000_000 and len(first["sites"]) == 2
    # Round 2: a wrong shape and NaN values.
    assert "shape (3, 3, 3), want" in second["rejected"][bad] and len(second["sites"]) == 2
    # Round 3: a valid head with a metric the others lack: aggregated (Flower's FedAvg alone would
    # have raised InconsistentMessageReplies and ended the run finished:failed).
    assert third["outcomes"]["site-2"] == "aggregated" and len(third["sites"]) == 3
    assert third["site_metrics"][bad]["surprise"] == 1.0
    # The final evaluation's list-valued metrics from site-2 are ignored, and recorded.
    assert "not a scalar" in third["evaluate_rejected"][bad]
    assert f"round 1: site-2 (node {bad}) rejected: head keys differ" in result.log_text


def test_fedmedian_keeps_the_head_near_the_honest_sites_despite_a_poisoned_one(
    tmp_path: Path,
    tiny_model_dirs: dict[str, Path],
    fault_app: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run_dir = _setup(monkeypatch, tmp_path)
    dumps = tmp_path / "honest-updates"
    dumps.mkdir()
    extra: dict[int, dict[str, ConfigValue]] = {i: {"fault-dump-dir": str(dumps)} for i in range(3)}
    extra[2]["fault"] = "poison"
    with _federation(tmp_path, 3, extra=extra) as (link, _):
        config = _config(
            tiny_model_dirs,
            run_dir,
            {
                "num-server-rounds": 1,
                "strategy": "fedmedian",
                "min-sites": 3,
                "max-update-norm": 1e6,  # the poison passes validation: only robustness can help
                "report-eval": False,
            },
        )
        result = run_app(fault_app, link.connection, run_config=config, timeout=RUN_TIMEOUT)
    assert result.ok, result.log_text[-3000:]
    assert _history(run_dir)[0]["outcomes"] == dict.fromkeys(
        ("site-0", "site-1", "site-2"), "aggregated"
    )
    honest = [dict(np.load(dumps / f"site-{i}-round1.npz")) for i in range(3)]
    head, _ = read_tensorfile(run_dir / "checkpoints" / "round-0001.safetensors", key="meta")
    offset = 5.0  # fault_clientapp.POISON_OFFSET
    for name, value in head.items():
        stack = np.stack([h[name] for h in honest])
        sent = stack.copy()
        sent[2] += offset
        # Flower's FedMedian really ran on what the sites sent ...
        np.testing.assert_allclose(value, np.median(sent, axis=0), rtol=1e-5, atol=1e-6)
        # ... and it stays within the honest updates' spread, far from the mean's offset / 3.
        honest_mean = stack.mean(axis=0)
        assert np.abs(value - honest_mean).max() <= np.ptp(stack, axis=0).max() + 1e-6
        assert np.abs(value - honest_mean).max() < 0.05 * offset / 3


def test_site_over_its_privacy_budget_declines_and_the_run_completes(
    tmp_path: Path,
    tiny_model_dirs: dict[str, Path],
    fault_app: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run_dir = _setup(monkeypatch, tmp_path)
    budget: dict[str, ConfigValue] = {"dp-noise-multiplier": 1.0, "dp-max-epsilon": 0.001}
    with _federation(tmp_path, 3, extra={2: budget}) as (link, _):
        config = _config(tiny_model_dirs, run_dir, {"num-server-rounds": 2, "loss": "proxy"})
        result = run_app(fault_app, link.connection, run_config=config, timeout=RUN_TIMEOUT)
    assert result.ok, result.log_text[-3000:]
    history = _history(run_dir)
    assert [e["round"] for e in history] == [1, 2]
    for entry in history:
        assert entry["outcomes"]["site-0"] == entry["outcomes"]["site-1"] == "aggregated"
        assert entry["outcomes"]["site-2"].startswith("declined: site declined")
        assert "dp-max-epsilon" in entry["outcomes"]["site-2"] and len(entry["sites"]) == 2
    assert "site-2 (node" in result.log_text and "declined: site declined" in result.log_text
    audit = [
        json.loads(line)
        for line in audit_path(tmp_path / "sites" / "site-2").read_text().splitlines()
    ]
    assert [e["declined"] for e in audit if e["message_type"] == "train"] == [True, True]
