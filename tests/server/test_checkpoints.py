"""The coordinator's run directory: atomic checkpoints, resumable history, corrupt newest checkpoint;
and resuming a crashed run through the ServerApp: the head it sends next is its checkpoint, bit for bit."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message, RecordDict
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from common.config import RunSettings
from common.errors import ConfigError
from common.flower import arrays_from_record, metric_record, record_from_arrays
from common.wire import ROUND_OFFSET, SERVER_ROUND, absolute_round
from server.app import run_federation
from server.checkpoints import RunStore
from tests.server.test_grid import DelayedGrid


def _arrays(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full((2, 3), value, np.float32), "scale": np.array(value, np.float32)}


def test_latest_checkpoint_round_trips_arrays_and_meta(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    assert store.latest_checkpoint() is None
    for r in range(3):
        store.save_checkpoint(r, _arrays(r), {"round": r})
    latest = store.latest_checkpoint()
    assert latest is not None and latest.round == 2 and latest.meta == {"round": 2}
    np.testing.assert_array_equal(latest.arrays["w"], _arrays(2)["w"])
    assert latest.arrays["scale"].shape == ()
    assert not list(tmp_path.rglob("*.tmp"))


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.save_checkpoint(1, _arrays(1), {})
    path = store.save_checkpoint(2, _arrays(2), {})
    path.write_bytes(path.read_bytes()[:30])
    latest = store.latest_checkpoint()
    assert latest is not None and latest.round == 1


def test_truncating_history_drops_rounds_after_the_checkpoint(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    for r in range(1, 6):
        store.append_history({"round": r})
    with open(store.history, "a") as handle:
        handle.write('{"round": 6, "cut')  # a line cut by a crash
    store.truncate_history(3)
    assert [e["round"] for e in store.read_history()] == [1, 2, 3]


def test_a_fresh_run_archives_the_previous_one_instead_of_mixing_histories(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "run")
    store.save_checkpoint(1, _arrays(1), {})
    store.append_history({"round": 1})
    archived = store.archive_previous()
    assert archived is not None and (archived / "history.jsonl").exists()
    assert store.read_history() == [] and store.latest_checkpoint() is None
    assert RunStore(tmp_path / "empty").archive_previous() is None


def test_a_checkpoint_whose_data_bytes_changed_is_corrupt_and_the_previous_one_is_used(
    tmp_path: Path,
) -> None:
    """safetensors has no checksum: a flipped byte in the data would load as another head."""
    store = RunStore(tmp_path)
    store.save_checkpoint(1, _arrays(1), {"round": 1})
    path = store.save_checkpoint(2, _arrays(2), {"round": 2})
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last array: the file still parses
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"round-0002\.safetensors is corrupt: its arrays do not"):
        RunStore.load_checkpoint(path, 2)
    latest = store.latest_checkpoint()
    assert latest is not None and latest.round == 1 and latest.meta == {"round": 1}


# ---------------------------------------------------------------- resume, through the ServerApp
# run_federation (the ServerApp's body) with Flower's strategy loop, against a stand-in Grid whose
# sites answer at once. "Arrays sent in round k+1" are the arrays in the train messages the
# coordinator pushes for that round.

NODES = (11, 12)
ROUNDS = 3


class _CoordinatorCrash(Exception):
    """The coordinator process dies (raised where it pushes a round's train messages)."""


def _absolute_round(message: Message) -> int:
    config = message.content.config_records["config"]
    return absolute_round(int(str(config[SERVER_ROUND])), int(str(config[ROUND_OFFSET])))


class _Sites(DelayedGrid):
    """Sites that reply at once: a train message with its arrays moved by a step that depends on the
    site and the round, an evaluate message with metrics. Records the arrays of every train message
    by absolute round; the coordinator "crashes" when it pushes the train messages of ``crash_at``."""

    def __init__(self, crash_at: int | None = None) -> None:
        super().__init__(dict.fromkeys(NODES, 0.0))
        self.crash_at = crash_at
        self.train_sent: dict[int, list[dict[str, np.ndarray]]] = {}

    @property
    def run(self) -> Run:
        return Run.create_empty(1)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        for message in messages:
            if message.metadata.message_type == "train":
                server_round = _absolute_round(message)
                sent = arrays_from_record(message.content.array_records["arrays"])
                self.train_sent.setdefault(server_round, []).append(sent)
                if server_round == self.crash_at:
                    raise _CoordinatorCrash(f"killed while sending round {server_round}")
        return super().push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        replies = []
        for message_id in message_ids:
            message = self.pushed[message_id]
            node = message.metadata.dst_node_id
            if message.metadata.message_type == "train":
                server_round = _absolute_round(message)
                step = np.float32(0.001 * (node - 10) * server_round)
                received = arrays_from_record(message.content.array_records["arrays"])
                content = RecordDict(
                    {
                        "arrays": record_from_arrays({k: v + step for k, v in received.items()}),
                        "metrics": metric_record({"num-examples": node, "train-loss": 1.0}),
                    }
                )
            else:
                content = RecordDict({"metrics": metric_record({"num-examples": 5, "r": 0.5})})
            replies.append(Message(content, reply_to=message))
        return replies


@pytest.fixture
def _serverapp_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's runtime sets the identity of a ServerApp process; building a Message needs it."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def _run(tmp_path: Path, tiny: dict[str, Path], **overrides: Any) -> RunSettings:
    values: dict[str, Any] = {
        "dataset": "digits",
        "dataset_n": 30,
        "image_encoder": str(tiny["image"]),
        "text_encoder": str(tiny["text"]),
        "encoder_image_size": 0,
        "head": "small",
        "min_sites": len(NODES),
        "num_server_rounds": ROUNDS,
        "run_dir": str(tmp_path / "run"),
        "round_timeout": 5.0,
        "first_round_timeout": 5.0,
        "reply_poll_interval": 0.01,
        **overrides,
    }
    return RunSettings(**values)


def _assert_bit_identical(sent: dict[str, np.ndarray], checkpoint: dict[str, np.ndarray]) -> None:
    assert set(sent) == set(checkpoint)  # a checkpoint reads back sorted by name
    for name, array in checkpoint.items():
        assert sent[name].dtype == array.dtype == np.float32, name
        assert sent[name].shape == array.shape and sent[name].tobytes() == array.tobytes(), name


def _crash_in_round(run: RunSettings, crash_at: int, run_id: int) -> _Sites:
    sites = _Sites(crash_at=crash_at)
    with pytest.raises(_CoordinatorCrash):
        run_federation(sites, run, run_id=run_id)
    return sites


def _rounds(store: RunStore) -> list[int]:
    return [int(e["round"]) for e in store.read_history()]


@pytest.mark.usefixtures("_serverapp_process")
@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_after_a_crash_in_round_k_plus_1_the_resumed_run_sends_checkpoint_k_bit_for_bit(
    strategy: str,
    tmp_path: Path,
    tiny_model_dirs: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = _run(tmp_path, tiny_model_dirs, strategy=strategy)
    k = ROUNDS - 1
    crashed = _crash_in_round(run, k + 1, run_id=1)
    store = RunStore(run.run_dir)
    assert _rounds(store) == list(range(1, k + 1))
    checkpoint = RunStore.load_checkpoint(store.checkpoints / f"round-{k:04d}.safetensors", k)
    for sent in crashed.train_sent[k + 1]:  # uninterrupted, round k+1 would have sent checkpoint k
        _assert_bit_identical(sent, checkpoint.arrays)

    resumed = _Sites()
    run_federation(resumed, replace(run, resume=True), run_id=2)
    assert f"resuming run from round {k}" in capsys.readouterr().out
    assert sorted(resumed.train_sent) == list(range(k + 1, ROUNDS + 1))  # no round repeated
    assert len(resumed.train_sent[k + 1]) == len(NODES)
    for sent in resumed.train_sent[k + 1]:
        _assert_bit_identical(sent, checkpoint.arrays)
    assert _rounds(store) == list(range(1, ROUNDS + 1))
    assert json.loads((store.root / "run.json").read_text())["started_round"] == k
    assert (store.root / "final").is_dir()


@pytest.mark.usefixtures("_serverapp_process")
def test_with_checkpoint_k_corrupt_the_run_resumes_from_k_minus_1_and_history_ends_there(
    tmp_path: Path, tiny_model_dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    run = _run(tmp_path, tiny_model_dirs)
    k = ROUNDS - 1
    _crash_in_round(run, k + 1, run_id=1)
    store = RunStore(run.run_dir)
    assert _rounds(store) == list(range(1, k + 1))
    newest = store.checkpoints / f"round-{k:04d}.safetensors"
    data = bytearray(newest.read_bytes())
    data[-1] ^= 0x01  # one flipped bit in its data: the file still parses
    newest.write_bytes(bytes(data))
    previous = RunStore.load_checkpoint(store.checkpoints / f"round-{k - 1:04d}.safetensors", k - 1)

    # Crash again as the resumed run sends its first round: what it sent and the history it kept.
    resumed = _crash_in_round(replace(run, resume=True), k, run_id=2)
    assert f"resuming run from round {k - 1}" in capsys.readouterr().out
    assert list(resumed.train_sent) == [k]
    for sent in resumed.train_sent[k]:
        _assert_bit_identical(sent, previous.arrays)
    assert _rounds(store) == list(range(1, k))  # round k's entry is gone with its checkpoint

    # Resumed once more, the run retrains round k on top of checkpoint k - 1 and completes.
    run_federation(_Sites(), replace(run, resume=True), run_id=3)
    assert _rounds(store) == list(range(1, ROUNDS + 1))
    latest = store.latest_checkpoint()
    assert latest is not None and latest.round == ROUNDS


@pytest.mark.usefixtures("_serverapp_process")
@pytest.mark.parametrize("strategy", ["fedadam", "fedyogi", "fedavgm"])
def test_a_resumed_run_with_a_stateful_server_optimiser_ends_where_the_uninterrupted_one_does(
    strategy: str, tmp_path: Path, tiny_model_dirs: dict[str, Path]
) -> None:
    """FedAdam/FedYogi moments and FedAvgM momentum are saved with each checkpoint and restored on
    resume (and FedAdam's bias correction keeps counting the run's rounds): restoring only the head
    would make the rounds after a resume differ from the uninterrupted run's."""
    config = {"strategy": strategy, "server_lr": 0.3, "server_momentum": 0.7}
    whole = _run(tmp_path / "whole", tiny_model_dirs, **config)
    run_federation(_Sites(), whole, run_id=1)
    resumed = _run(tmp_path / "resumed", tiny_model_dirs, **config)
    _crash_in_round(resumed, ROUNDS, run_id=2)
    assert (RunStore(resumed.run_dir).checkpoints / "server-state").is_dir()
    run_federation(_Sites(), replace(resumed, resume=True), run_id=3)
    ends = [RunStore(r.run_dir).latest_checkpoint() for r in (whole, resumed)]
    assert ends[0] is not None and ends[1] is not None and ends[0].round == ends[1].round == ROUNDS
    _assert_bit_identical(ends[1].arrays, ends[0].arrays)
