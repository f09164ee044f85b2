"""The ServerApp's verdicts: a run-config no site could run is refused before round 1, a round that
aggregates nothing stops the run with each site's reason, and no final head comes from a head that
never trained. Called in-process with a stand-in Grid whose sites answer with Flower messages."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from common.config import RunSettings
from common.errors import ConfigError
from common.wire import CONFIG_RECORD, TASK_CLASSES
from server.app import main, run_federation
from server.strategy import EmptyRoundError, RunFailed
from tests.server.test_grid import DelayedGrid


@pytest.fixture(autouse=True)
def _serverapp_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's runtime sets the identity of a ServerApp process; building a Message needs it."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


class _Untouched(Grid):
    """A grid the ServerApp must not use: the run is refused before any round."""

    def _unused(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the run was not refused before round 1")

    set_run = create_message = get_node_ids = push_messages = pull_messages = _unused
    send_and_receive = _unused
    run = property(_unused)


def _context(run_config: dict[str, Any]) -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)


def test_the_coordinator_refuses_sample_level_dp_with_infonce_before_round_1(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = {"loss": "infonce", "dp-noise-multiplier": 1.0, "run-dir": str(tmp_path / "run")}
    with pytest.raises(ConfigError, match=r"dp-noise-multiplier = 1\.0 turns on sample-level DP"):
        main(_Untouched(), _context(config))
    out = capsys.readouterr().out
    assert "[fedembed] run failed: run-config: dp-noise-multiplier = 1.0" in out
    assert not (tmp_path / "run").exists()


def test_the_coordinator_refuses_a_site_column_with_fewer_values_than_min_sites(
    tmp_path: Path,
) -> None:
    manifest = tmp_path / "three-sites.csv"
    rows = [f"r{i},report {i},{'a' if i % 2 else 'b'},{'XYZ'[i % 3]}" for i in range(9)]
    manifest.write_text("id,text,label,site\n" + "\n".join(rows) + "\n", encoding="utf-8")
    config = {"dataset": str(manifest), "partition": "site", "min-sites": 4}
    with pytest.raises(
        ConfigError, match=r"3 distinct values \(X, Y, Z\), but the run has min-sites = 4"
    ):
        main(_Untouched(), _context(config))


class _FailingSites(DelayedGrid):
    """Every site answers every message with an error, as a ClientApp that raised does (node ids
    above 1: Flower's own replies for unreachable nodes come from node 1)."""

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        replies = []
        for message_id in message_ids:
            message = self.pushed[message_id]
            node = message.metadata.dst_node_id
            reason = (
                f"[site site-{node}] DataError: site-{node}.csv line 2 field 'image': unreadable"
            )
            replies.append(Message(Error(code=0, reason=reason), reply_to=message))
        return replies

    @property
    def run(self) -> Run:  # Flower's legacy client manager (SecAgg+) reads the run id
        return Run.create_empty(1)


def _run(tmp_path: Path, tiny: dict[str, Path], **overrides: Any) -> RunSettings:
    values: dict[str, Any] = {
        "dataset": "digits",
        "dataset_n": 30,
        "image_encoder": str(tiny["image"]),
        "text_encoder": str(tiny["text"]),
        "encoder_image_size": 0,
        "head": "small",
        "min_sites": 2,
        "num_server_rounds": 2,
        "run_dir": str(tmp_path / "run"),
        "round_timeout": 5.0,
        "first_round_timeout": 5.0,
        "reply_poll_interval": 0.01,
        **overrides,
    }
    return RunSettings(**values)


def _history(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "history.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line]


def test_a_round_in_which_every_site_fails_stops_the_run_without_a_final_head(
    tmp_path: Path, tiny_model_dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    run = _run(tmp_path, tiny_model_dirs)
    grid = _FailingSites({11: 0.0, 12: 0.0})
    with pytest.raises(EmptyRoundError) as stopped:
        run_federation(grid, run, run_id=1)
    message = str(stopped.value)
    assert message.startswith("round 1: no site's update was aggregated")
    # a built-in dataset's classes are not sent (real sites bring their own data instead)
    configs = [m.content[CONFIG_RECORD] for m in grid.pushed.values()]
    assert configs and all(TASK_CLASSES not in c for c in configs)
    for node in (11, 12):
        assert f"site-{node} (node {node}) failed: DataError: site-{node}.csv line 2" in message
    run_dir = Path(run.run_dir)
    (entry,) = _history(run_dir)  # the failed round is recorded ...
    assert entry["round"] == 1 and entry["head_updated"] is False and entry["sites"] == []
    assert set(entry["outcomes"]) == {"site-11", "site-12"}
    assert all(o.startswith("failed: DataError") for o in entry["outcomes"].values())
    # ... but not checkpointed (a resumed run retries it), and nothing is exported.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round-0000.safetensors"]
    assert not (run_dir / "final").exists()
    out = capsys.readouterr().out
    assert "round 1: 0 sites aggregated (head unchanged), 0 rejected, 0 declined, 2 failed" in out


def test_rounds_allowed_to_be_empty_still_export_no_head_that_never_trained(
    tmp_path: Path, tiny_model_dirs: dict[str, Path]
) -> None:
    run = _run(tmp_path, tiny_model_dirs, max_empty_rounds=5)
    with pytest.raises(RunFailed, match="none of the run's 2 round"):
        run_federation(_FailingSites({11: 0.0, 12: 0.0}), run, run_id=1)
    run_dir = Path(run.run_dir)
    assert [e["round"] for e in _history(run_dir)] == [1, 2]
    assert not (run_dir / "final").exists()


def test_a_secure_aggregation_round_in_which_every_site_fails_stops_the_run(
    tmp_path: Path, tiny_model_dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from server.secagg import run_secure_federation

    run = _run(tmp_path, tiny_model_dirs, secure_aggregation=True)
    context = _context({})
    with pytest.raises(EmptyRoundError) as stopped:
        run_secure_federation(_FailingSites({11: 0.0, 12: 0.0}), context, run, data_spec={})
    message = str(stopped.value)
    assert message.startswith("round 1: no site's update was aggregated")
    for node in (11, 12):  # SecAgg+'s first stage is where they failed
        assert f"site-{node} (node {node}) failed: setup: DataError: site-{node}.csv" in message
    run_dir = Path(run.run_dir)
    (entry,) = _history(run_dir)
    assert entry["head_updated"] is False and entry["sites"] == [] and len(entry["failed"]) == 2
    assert not (run_dir / "final").exists()
    assert "round 1: 0 sites aggregated (head unchanged), 0 rejected, 0 declined, 2 failed" in (
        capsys.readouterr().out
    )
