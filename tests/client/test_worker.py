"""The site worker: same results as in-process, authenticated, and gone when the SuperNode is gone."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.training import execute
from client.worker import WorkerFailed, call_worker, worker_address
from common.artifacts import state_arrays
from common.config import RunSettings, SiteSettings
from common.training import build_run_model
from tests.tiny_config import tiny_run_config

pytestmark = pytest.mark.slow


def _request(tiny: dict[str, Path], state: Path) -> dict[str, Any]:
    run_config = tiny_run_config(tiny, **{"dataset-n": 60, "local-epochs": 1})
    node_config = {"state-dir": str(state), "cache-dir": str(state / "cache"), "worker": "on"}
    from client.site import load_site

    run = RunSettings.from_run_config(run_config)
    site = load_site(SiteSettings.from_node_config(node_config), run)
    incoming = state_arrays(
        build_run_model(run, dims=site.train.dims, num_classes=site.train.num_classes)
    )
    return {
        "op": "train",
        "incoming": incoming,
        "run": run_config,
        "site": node_config,
        "config": {"server-round": 1},
        "run_id": 7,
    }


@contextlib.contextmanager
def _reaped(pids: list[int]) -> Iterator[list[int]]:
    try:
        yield pids
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return True
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return True
        time.sleep(0.2)
    return False


def test_worker_gives_the_in_process_result_and_exits_with_its_parent(
    tmp_path: Path, tiny_model_dirs: dict[str, Path]
) -> None:
    request = _request(tiny_model_dirs, tmp_path / "site")
    expected = execute(request)
    parent = subprocess.Popen(["sleep", "120"])  # stands in for the SuperNode's process tree
    with _reaped([parent.pid]) as pids:
        reply = call_worker(tmp_path / "site", request, parent_pid=parent.pid)
        pids.append(reply["worker_pid"])
        assert reply["metrics"]["num-examples"] == expected["metrics"]["num-examples"]
        for name, value in expected["arrays"].items():
            np.testing.assert_allclose(reply["arrays"][name], value, rtol=1e-5, atol=1e-6)
        second = call_worker(tmp_path / "site", request, parent_pid=parent.pid)
        assert second["worker_pid"] == reply["worker_pid"]  # the same warm process
        bad = {**request, "incoming": {"nope": np.zeros(1, np.float32)}}
        with pytest.raises(WorkerFailed, match="head keys differ"):
            call_worker(tmp_path / "site", bad, parent_pid=parent.pid)
        parent.kill()
        parent.wait()
        assert _gone(reply["worker_pid"], timeout=15)


def test_worker_refuses_clients_without_the_site_key(
    tmp_path: Path, tiny_model_dirs: dict[str, Path]
) -> None:
    from multiprocessing import AuthenticationError
    from multiprocessing.connection import Client

    request = _request(tiny_model_dirs, tmp_path / "site")
    with _reaped([]) as pids:
        reply = call_worker(tmp_path / "site", request, parent_pid=os.getpid())
        pids.append(reply["worker_pid"])
        with pytest.raises((AuthenticationError, EOFError, ConnectionError)):
            Client(worker_address(tmp_path / "site"), family="AF_UNIX", authkey=b"guess" * 8)
