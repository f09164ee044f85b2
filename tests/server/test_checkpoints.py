"""The coordinator's run directory: atomic checkpoints, resumable history, corrupt newest checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from server.checkpoints import RunStore


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
