"""End-to-end tests of simulations.flower.processes with real Flower processes and a numpy-only toy app."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from simulations.flower.flwr_cli import (
    FINISHED_COMPLETED,
    FlowerError,
    flower_command,
    run_app,
    run_status,
    wait_for_run,
)
from simulations.flower.local import LocalSuperLink, LocalSuperNode, local_federation
from simulations.flower.processes import ManagedProcess, descendants, live_pids, pid_alive
from simulations.flower.run_config import ConfigValue

TOY_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "toyapp"
version = "1.0.0"
license = { file = "LICENSE" }
dependencies = ["flwr>=1.41", "numpy"]

[tool.flwr.app]
publisher = "fedembed"
fab-format-version = 1
flwr-version-target = "1.41.0"

[tool.flwr.app.components]
serverapp = "toyserver:app"
clientapp = "toyclient:app"

[tool.flwr.app.config]
num-server-rounds = 2
min-nodes = 2
fail-server = false
result-path = ""
"""

TOY_CLIENT = '''\
"""Toy ClientApp: replies with arrays filled with its node's value."""
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def _value(context: Context) -> float:
    if "value" in context.node_config:
        return float(context.node_config["value"])
    return float(context.node_config["partition-id"]) + 1.0


@app.train()
def train(msg: Message, context: Context) -> Message:
    arrays = msg.content["arrays"].to_numpy_ndarrays()
    value = _value(context)
    metrics = MetricRecord({
        "num-examples": int(context.node_config.get("num-examples", 10)),
        "value": value,
        "server-round": int(msg.content["config"]["server-round"]),
    })
    info = ConfigRecord({key: val for key, val in context.node_config.items()})
    reply = RecordDict({
        "arrays": ArrayRecord([np.full_like(a, value) for a in arrays]),
        "metrics": metrics,
        "info": info,
    })
    return Message(reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    mean = float(np.mean(msg.content["arrays"].to_numpy_ndarrays()[0]))
    metrics = MetricRecord({"num-examples": 10, "mean": mean})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
'''

TOY_SERVER = '''\
"""Toy ServerApp: FedAvg over one small array; writes what it saw to result-path."""
import json
import os

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


class RecordingFedAvg(FedAvg):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rounds = []
        self.sent = []

    def configure_train(self, server_round, arrays, config, grid):
        self.sent = list(super().configure_train(server_round, arrays, config, grid))
        return self.sent

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        # The Grid set message_id on the sent Messages in place when it pushed them.
        dst_of = {m.metadata.message_id: m.metadata.dst_node_id for m in self.sent}
        self.rounds.append([
            {
                "node": r.metadata.src_node_id,
                "sent-to": dst_of.get(r.metadata.reply_to_message_id),
                "error": r.error.reason if r.has_error() else None,
                "bytes": sum(a.count_bytes() for a in r.content.array_records.values()),
                "info": dict(r.content["info"]),
            }
            for r in replies
        ])
        return super().aggregate_train(server_round, replies)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    if cfg["fail-server"]:
        raise RuntimeError("toy ServerApp failure")
    n = int(cfg["min-nodes"])
    strategy = RecordingFedAvg(min_train_nodes=n, min_evaluate_nodes=n, min_available_nodes=n)
    evaluated = {}

    def evaluate_fn(server_round, arrays):
        evaluated[server_round] = float(arrays.to_numpy_ndarrays()[0].mean())
        return MetricRecord({"mean": evaluated[server_round]})

    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord([np.zeros((2, 3), dtype=np.float32)]),
        num_rounds=int(cfg["num-server-rounds"]),
        train_config=ConfigRecord({"lr": 0.1}),
        evaluate_fn=evaluate_fn,
        timeout=120,
    )
    final = result.arrays.to_numpy_ndarrays()[0]
    out = {
        "final": final.tolist(),
        "dtype": str(final.dtype),
        "evaluated": evaluated,
        "rounds": strategy.rounds,
        "nodes": sorted(grid.get_node_ids()),
    }
    with open(str(cfg["result-path"]), "w") as handle:
        json.dump(out, handle)
'''


def _write_toy_app(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "pyproject.toml").write_text(TOY_PYPROJECT)
    (root / "LICENSE").write_text("Apache-2.0 (toy app for tests)\n")
    (root / "toyclient.py").write_text(TOY_CLIENT)
    (root / "toyserver.py").write_text(TOY_SERVER)
    return root


@pytest.fixture(scope="module")
def toy_app(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_toy_app(tmp_path_factory.mktemp("apps") / "toyapp")


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[LocalSuperLink, list[LocalSuperNode]]]:
    """A SuperLink (with a database) and two SuperNodes with different values and weights."""
    run_dir = tmp_path_factory.mktemp("deploy")
    configs: list[dict[str, ConfigValue]] = [
        {"value": 1.0, "num-examples": 10, "site": "site A's data"},
        {"value": 4.0, "num-examples": 30, "site": 'C:\\data\\"b"'},
    ]
    with local_federation(run_dir, configs, database=run_dir / "state.db") as federation:
        yield federation


def test_stop_ends_a_descendant_that_left_for_its_own_session(tmp_path: Path) -> None:
    """psutil finds the tree; a grandchild that called setsid() is still ended by session."""
    process = ManagedProcess(
        "tree", ["sh", "-c", "setsid sleep 60 & sleep 60"], env=os.environ, log_dir=tmp_path
    )
    deadline = time.monotonic() + 10
    while len(descendants(process.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    children = descendants(process.pid)
    assert len(children) == 2
    assert pid_alive(process.pid) and all(pid_alive(child.pid) for child in children)
    process.stop(timeout=2)
    assert not process.running
    assert not [child.pid for child in children if pid_alive(child.pid)]
    assert process.pid not in live_pids()


@pytest.mark.slow
def test_simulation_run_with_three_virtual_nodes(toy_app: Path, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    with LocalSuperLink(tmp_path, simulation=True) as link:
        result = run_app(
            toy_app,
            link.connection,
            run_config={"result-path": str(out), "min-nodes": 3},
            federation_config={"num-supernodes": 3, "client-resources-num-cpus": 1},
            timeout=240,
        )
    assert result.ok, result.log_text
    seen = json.loads(out.read_text())
    assert seen["final"] == [[2.0] * 3] * 2  # partition-id 0, 1, 2 -> values 1, 2, 3
    assert len(seen["nodes"]) == 3
    for replies in seen["rounds"]:
        infos = sorted((r["info"]["partition-id"], r["info"]["num-partitions"]) for r in replies)
        assert infos == [(0, 3), (1, 3), (2, 3)]


@pytest.mark.slow
def test_timeout_stops_run_and_no_process_outlives_the_federation(
    toy_app: Path, tmp_path: Path
) -> None:
    pids: set[int] = set()
    roots: list[int] = []
    sampling_done = threading.Event()

    def sample() -> None:  # every process of the federation, ServerApp and ClientApps included
        while not sampling_done.is_set():
            for root in roots:
                pids.update([root, *(p.pid for p in descendants(root))])
            time.sleep(0.3)

    with (
        pytest.raises(RuntimeError, match="boom"),
        local_federation(tmp_path, [{"value": 1.0}, {"value": 2.0}]) as (link, nodes),
    ):
        roots += [p.pid for p in (link.process, *(n.process for n in nodes)) if p is not None]
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            with pytest.raises(FlowerError, match="did not finish within 15 s") as raised:
                run_app(toy_app, link.connection, run_config={"num-server-rounds": 50}, timeout=15)
        finally:
            sampling_done.set()
            sampler.join()
        found = re.search(r"Flower run (\d+)", str(raised.value))
        assert found is not None
        assert run_status(link.connection, int(found.group(1))).status == "finished:stopped"
        assert len(pids) >= 7  # SuperLink, 2 SuperNodes, 3 SuperExecs, ServerApp (+ ClientApps)
        raise RuntimeError("boom")
    survivors = [pid for pid in pids if pid_alive(pid)]
    assert not survivors, [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in survivors]
    assert not set(live_pids()) & set(roots)


@pytest.mark.slow
def test_supernode_kill_and_restart_gets_new_node_id(tmp_path: Path) -> None:
    with LocalSuperLink(tmp_path) as link:
        node = LocalSuperNode(link.address, tmp_path, name="site", home=link.home).start()
        first = node.node_id
        assert node.process is not None
        node.process.remember_tree()
        old = node.process.all_pids()
        assert len(old) >= 2  # the SuperNode and its SuperExec
        node.restart(kill=True)
        assert not [pid for pid in old if pid_alive(pid)]
        assert node.node_id is not None and node.node_id != first
        node.stop()
        assert not node.running


@pytest.mark.slow
def test_deployment_run_completes_with_weighted_mean(
    deployment: tuple[LocalSuperLink, list[LocalSuperNode]], toy_app: Path, tmp_path: Path
) -> None:
    link, nodes = deployment
    out = tmp_path / "result.json"
    result = run_app(
        toy_app,
        link.connection,
        run_config={"result-path": str(out)},
        log_dir=tmp_path,
        timeout=240,
    )
    assert result.ok, result.log_text
    assert result.status == FINISHED_COMPLETED
    assert "[ROUND 2/2]" in result.log_text
    assert result.log_path is not None and result.log_path.exists()
    seen = json.loads(out.read_text())
    expected = (1.0 * 10 + 4.0 * 30) / 40
    assert seen["final"] == [[expected] * 3] * 2
    assert seen["dtype"] == "float32"
    assert seen["evaluated"] == {"0": 0.0, "1": expected, "2": expected}
    node_ids = sorted(n.node_id for n in nodes if n.node_id is not None)
    assert seen["nodes"] == node_ids
    for replies in seen["rounds"]:
        assert sorted(r["node"] for r in replies) == node_ids
        assert all(r["sent-to"] == r["node"] for r in replies)
        assert all(
            r["error"] is None and 24 < r["bytes"] < 400 for r in replies
        )  # npy header + data
        assert sorted(r["info"]["site"] for r in replies) == sorted(
            str(n.node_config["site"]) for n in nodes
        )


@pytest.mark.slow
def test_failed_serverapp_is_not_success_although_flwr_run_exits_zero(
    deployment: tuple[LocalSuperLink, list[LocalSuperNode]], toy_app: Path
) -> None:
    link, _ = deployment
    conn = link.connection
    argv = [flower_command("flwr"), "run", str(toy_app), conn.name, "--stream"]
    argv += ["--run-config", "fail-server=true"]
    done = subprocess.run(argv, env=conn.env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0
    found = re.search(r"Successfully started run (\d+)", done.stdout + done.stderr)
    assert found is not None, done.stdout
    status = wait_for_run(conn, int(found.group(1)), timeout=60)
    assert status.status == "finished:failed"
    assert "toy ServerApp failure" in status.details

    result = run_app(toy_app, conn, run_config={"fail-server": True}, stream=False, timeout=120)
    assert not result.ok
    assert result.status == "finished:failed"
    assert "toy ServerApp failure" in result.log_text
    with pytest.raises(FlowerError, match="finished:failed"):
        result.raise_for_status()
