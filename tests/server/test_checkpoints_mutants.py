"""The run directory's remaining promises, each pinned by a mutant that survived the older tests
(docs/results/mutation.md): its layout, archiving an earlier run, the exported final head, run.json,
and a history that survives a crash mid-line and reads the same whoever wrote it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from common.artifacts import load_head, state_arrays
from common.errors import ConfigError
from common.heads import HeadConfig
from common.tensorfile import write_tensorfile
from common.training import build_head_model
from server.checkpoints import RunStore

_ARCHIVE = re.compile(r"^run\.previous-\d{8}-\d{6}$")


def _arrays(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full((2, 3), value, np.float32)}


def test_checkpoints_live_under_checkpoints_named_by_round(tmp_path: Path) -> None:
    path = RunStore(tmp_path).save_checkpoint(7, _arrays(7), {"round": 7})
    assert path == tmp_path / "checkpoints" / "round-0007.safetensors" and path.is_file()


def test_an_earlier_run_with_only_a_history_is_archived_under_a_timestamped_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    store = RunStore(run)
    store.append_history({"round": 1})  # crashed before its first checkpoint
    store.start_fresh(_arrays(0), {"round": 0})
    archives = [p for p in tmp_path.iterdir() if p != run]
    assert len(archives) == 1 and _ARCHIVE.match(archives[0].name), archives
    assert (archives[0] / "history.jsonl").is_file() and not store.history.exists()
    latest = store.latest_checkpoint()
    assert latest is not None and latest.round == 0 and latest.meta == {"round": 0}
    np.testing.assert_array_equal(latest.arrays["w"], _arrays(0)["w"])
    assert f"an earlier run in {run} was moved to {archives[0]}" in capsys.readouterr().out


def test_two_earlier_runs_archived_in_one_second_keep_separate_archives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The archive name has one-second resolution: a second archive must not merge into the first."""
    import time

    monkeypatch.setattr(time, "strftime", lambda *_: "20260101-000000")
    run = tmp_path / "run"
    store = RunStore(run)
    for value in (1.0, 2.0):
        store.append_history({"round": 1, "value": value})
        store.start_fresh(_arrays(value), {"round": 0})
    archives = sorted(p.name for p in tmp_path.iterdir() if p != run)
    assert archives == ["run.previous-20260101-000000", "run.previous-20260101-000000-2"]
    first, second = (tmp_path / name / "history.jsonl" for name in archives)
    assert json.loads(first.read_text())["value"] == 1.0
    assert json.loads(second.read_text())["value"] == 2.0
    assert (tmp_path / archives[1] / "checkpoints" / "round-0000.safetensors").is_file()


def test_a_fresh_run_dir_archives_nothing_and_says_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = RunStore(tmp_path / "run")
    store.start_fresh(_arrays(0), {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert store.latest_checkpoint() is not None
    assert "moved to" not in capsys.readouterr().out


def test_export_final_writes_a_head_that_evaluate_loads_with_the_given_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = build_head_model(
        dims={"image": 6, "text": 5}, head_config=HeadConfig(out_dim=4, hidden_dim=8), seed=1
    )
    trained = {k: v + 0.5 for k, v in state_arrays(model).items()}
    path = RunStore(tmp_path).export_final(model, trained, {"note": "final"})
    assert path == tmp_path / "final"
    loaded, config = load_head(path)
    assert config["note"] == "final"
    for key, value in state_arrays(loaded).items():
        np.testing.assert_array_equal(value, trained[key])
    assert f"final head exported to {path}" in capsys.readouterr().out


def test_export_final_names_the_final_head_when_its_arrays_do_not_fit(tmp_path: Path) -> None:
    model = build_head_model(
        dims={"image": 6, "text": 5}, head_config=HeadConfig(out_dim=4, hidden_dim=8)
    )
    with pytest.raises(ConfigError, match=r"^final global head: head keys differ"):
        RunStore(tmp_path).export_final(model, _arrays(1), {})
    assert not (tmp_path / "final").exists()


def test_run_info_is_written_as_run_json(tmp_path: Path) -> None:
    RunStore(tmp_path).write_run_info({"strategy": "fedavg", "rounds": 3})
    assert json.loads((tmp_path / "run.json").read_text()) == {"strategy": "fedavg", "rounds": 3}


def test_an_unreadable_checkpoint_is_named_in_the_error(tmp_path: Path) -> None:
    path = RunStore(tmp_path).save_checkpoint(1, _arrays(1), {})
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=f"^checkpoint {re.escape(str(path))} is unreadable: "):
        RunStore.load_checkpoint(path, 1)


def test_history_lines_are_canonical_json_and_take_any_value_as_text(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.append_history({"round": 1, "b": 2, "a": 1, "where": tmp_path})
    line = store.history.read_text().splitlines()[0]
    assert line == json.dumps({"a": 1, "b": 2, "round": 1, "where": str(tmp_path)})


def test_a_line_cut_by_a_crash_does_not_hide_the_rounds_appended_after_it(
    tmp_path: Path,
) -> None:
    store = RunStore(tmp_path)
    store.append_history({"round": 1})
    with open(store.history, "a") as handle:
        handle.write('{"round": 2, "cu\n')  # the crash; the next run appends after it
    store.append_history({"round": 2})
    assert [e["round"] for e in store.read_history()] == [1, 2]


def test_truncating_keeps_entries_without_a_round_as_round_zero(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.append_history({"event": "started"})
    store.append_history({"round": 1})
    store.truncate_history(0)
    assert store.read_history() == [{"event": "started"}]


def test_server_state_round_trips_beside_its_checkpoint_and_none_is_written_when_empty(
    tmp_path: Path,
) -> None:
    store = RunStore(tmp_path)
    state = {"m": np.arange(6, dtype=np.float32).reshape(2, 3), "v": np.ones(3, np.float32)}
    store.save_server_state(4, state)
    assert (tmp_path / "checkpoints" / "server-state" / "round-0004.safetensors").is_file()
    loaded = store.load_server_state(4)
    assert loaded is not None and sorted(loaded) == ["m", "v"]
    for key, value in state.items():
        np.testing.assert_array_equal(loaded[key], value)
    assert store.load_server_state(3) is None
    store.save_server_state(5, {})
    assert not (tmp_path / "checkpoints" / "server-state" / "round-0005.safetensors").exists()


def test_a_corrupt_server_state_reads_as_none(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.save_server_state(2, {"m": np.ones(4, np.float32)})
    path = tmp_path / "checkpoints" / "server-state" / "round-0002.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # a flipped byte in the array data
    path.write_bytes(bytes(data))
    assert store.load_server_state(2) is None


def test_the_arrays_digest_covers_names_dtypes_shapes_and_bytes_not_order() -> None:
    from server.checkpoints import arrays_digest

    base: dict[str, np.ndarray] = {
        "a": np.arange(6, dtype=np.float32),
        "b": np.zeros(2, np.float32),
    }
    digest = arrays_digest(base)
    assert len(digest) == 64 and digest == arrays_digest(dict(reversed(list(base.items()))))
    changes: list[dict[str, np.ndarray]] = [
        {"a2": base["a"], "b": base["b"]},
        {**base, "a": base["a"].astype(np.float64)},
        {**base, "a": base["a"].reshape(2, 3)},
        {**base, "a": base["a"] + 1},
    ]
    for changed in changes:
        assert arrays_digest(changed) != digest


def test_a_checkpoint_written_before_digests_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints" / "round-0001.safetensors"
    write_tensorfile(path, _arrays(1), key="meta", document={"round": 1})
    loaded = RunStore.load_checkpoint(path, 1)
    assert loaded.meta == {"round": 1}
    np.testing.assert_array_equal(loaded.arrays["w"], _arrays(1)["w"])


def test_a_checkpoint_whose_document_is_not_a_mapping_loads_it_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints" / "round-0001.safetensors"
    write_tensorfile(path, _arrays(1), key="meta", document=["round", 1])
    assert RunStore.load_checkpoint(path, 1).meta == ["round", 1]
