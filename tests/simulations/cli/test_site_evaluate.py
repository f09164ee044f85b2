"""`fedembed evaluate --data FILE` scores every row of FILE for any saved head, and says what the
frozen baselines were fitted on (--train-data, the head's own training split, or left out)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from common.artifacts import load_head, save_head
from common.config import DataSpec, RunSettings
from server.app import _evaluation_spec
from simulations.cli.app import main
from tests.simulations.site_files import enter_workdir, link_encoders, write_site


@pytest.fixture()
def cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_dirs: dict[str, Path]
) -> dict[str, str]:
    """A working directory with the tiny encoders under models/; returns their relative paths."""
    return link_encoders(enter_workdir(tmp_path, monkeypatch), tiny_model_dirs)


def _encoders(models: dict[str, str]) -> list[str]:
    return ["--image-encoder", models["image"], "--text-encoder", models["text"]]


def _train(models: dict[str, str], data: str, out: str, *extra: str, loss: str = "supcon") -> None:
    argv = ["train", "--data", data, "--out", out, "--cache-dir", "cache", *_encoders(models)]
    argv += ["--epochs", "2", "--head", "small", "--loss", loss, *extra]
    assert main(argv) == 0


def _evaluate(*argv: str) -> dict[str, Any]:
    assert main(["evaluate", *argv, "--cache-dir", "cache", "--json", "metrics.json"]) == 0
    return dict(json.loads(Path("metrics.json").read_text()))


def _rows(metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["embeddings"]: row for row in metrics["rows"]}


def test_every_row_of_the_file_is_scored_baselines_on_the_heads_training_split(
    cwd: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    write_site(Path("train.csv"), 30)
    write_site(Path("test.csv"), 25, start=100)
    _train(cwd, "train.csv", "head")
    capsys.readouterr()
    metrics = _evaluate("--head", "head", "--data", "test.csv")
    assert metrics["num_test"] == 25  # not a 20% re-split of the test file
    assert metrics["scored"] == f"{Path.cwd() / 'test.csv'}, every row (25)"
    num_train = metrics["num_train"]
    assert 0 < num_train < 30  # the head's training split of train.csv, its held-out rows excluded
    assert metrics["fitted_on"] == (
        f"{Path.cwd() / 'train.csv'}, the head's training split ({num_train} rows)"
    )
    rows = _rows(metrics)
    assert {"chance", "frozen+lstsq", "frozen+cca", "frozen", "projected"} <= set(rows)
    assert "probe_f1_macro" in rows["projected"] and "mean_R@5" in rows["projected"]
    out = capsys.readouterr().out
    assert f"scored: {metrics['scored']}" in out
    assert f"alignment baselines and probes fitted on: {metrics['fitted_on']}" in out


def test_split_column_scores_exactly_the_rows_marked_test(
    cwd: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    write_site(Path("train.csv"), 30)
    write_site(Path("test.csv"), 24, start=100, split=lambda k: "test" if k % 3 == 0 else "train")
    _train(cwd, "train.csv", "head")
    metrics = _evaluate("--head", "head", "--data", "test.csv")
    assert metrics["num_test"] == 8
    assert metrics["scored"] == (
        f"{Path.cwd() / 'test.csv'}, the 8 rows marked test in its split column "
        "(16 other rows not scored)"
    )


def test_train_data_fits_the_baselines_on_its_rows_not_marked_test(
    cwd: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    write_site(Path("train.csv"), 30)
    write_site(Path("site.csv"), 30, start=100, split=lambda k: "test" if k % 5 == 0 else "")
    _train(cwd, "train.csv", "head")
    metrics = _evaluate("--head", "head", "--data", "site.csv", "--train-data", "site.csv")
    assert metrics["num_test"] == 6 and metrics["num_train"] == 24
    assert metrics["fitted_on"] == (
        f"{Path.cwd() / 'site.csv'} (--train-data), 24 rows not marked test"
    )
    assert "frozen+cca" in _rows(metrics)


def test_baselines_are_left_out_when_the_heads_training_data_is_not_here(
    cwd: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    write_site(Path("elsewhere") / "train.csv", 30)
    write_site(Path("test.csv"), 20, start=100)
    _train(cwd, "elsewhere/train.csv", "head")
    shutil.rmtree("elsewhere")  # the head travelled to a machine without its training data
    metrics = _evaluate("--head", "head", "--data", "test.csv")
    assert metrics["num_test"] == 20 and metrics["num_train"] == 0
    assert metrics["fitted_on"] == (
        f"left out: the head's training data ({Path.cwd() / 'elsewhere' / 'train.csv'}) is not "
        "on this machine; name training data with --train-data"
    )
    rows = _rows(metrics)
    assert set(rows) == {"chance", "projected"}  # nothing fitted, nothing fitted on test rows
    assert "mean_R@5" in rows["projected"] and "probe_f1_macro" not in rows["projected"]


def test_scoring_the_heads_own_file_leaves_the_baselines_out_and_says_why(
    cwd: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    write_site(Path("site.csv"), 30)
    _train(cwd, "site.csv", "head")
    capsys.readouterr()
    metrics = _evaluate("--head", "head", "--data", "site.csv")
    assert metrics["num_test"] == 30 and set(_rows(metrics)) == {"chance", "projected"}
    assert metrics["fitted_on"].startswith("left out: the head's training rows are among")
    assert "the scored rows include its training rows" in capsys.readouterr().out


def test_probes_fitted_on_one_file_score_another_files_labels_by_class_name(
    cwd: dict[str, str],
) -> None:
    """test.csv has two of train.csv's three classes: its label 0 is 'nodule', train's is
    'effusion'. Identical reports per class make the frozen text probe exact when the classes
    are matched by name (and wrong on every row when matched by index)."""
    write_site(Path("train.csv"), 30, images=False, findings=("effusion", "nodule", "normal"))
    write_site(Path("test.csv"), 12, images=False, findings=("nodule", "normal"), start=100)
    _train(cwd, "train.csv", "head", loss="supcon")
    metrics = _evaluate("--head", "head", "--data", "test.csv")
    assert _rows(metrics)["frozen"]["probe_acc"] == 1.0


def test_a_file_without_the_heads_modalities_is_one_line(
    cwd: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    write_site(Path("train.csv"), 30)
    write_site(Path("notes.csv"), 10, images=False)
    _train(cwd, "train.csv", "head")
    capsys.readouterr()
    assert main(["evaluate", "--head", "head", "--data", "notes.csv", "--cache-dir", "cache"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{Path.cwd() / 'notes.csv'}: gives text 32-d with the head's encoders" in err
    assert "takes image 24-d, text 32-d" in err


def test_train_data_without_data_is_refused(
    cwd: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    write_site(Path("train.csv"), 6)
    assert main(["evaluate", "--head", "head", "--train-data", "train.csv"]) == 2
    assert "--train-data needs --data" in capsys.readouterr().err


def test_federated_run_records_dataset_n_only_for_built_in_datasets() -> None:
    manifest = RunSettings(dataset="/data/site.csv", dataset_n=2000)
    assert _evaluation_spec(manifest)["n"] is None
    assert _evaluation_spec(RunSettings(dataset="digits", dataset_n=300))["n"] == 300
    # the images are drawn as the sites drew them
    drawn = RunSettings(dataset="digits", dataset_image_size=16)
    assert _evaluation_spec(drawn)["image_size"] == 16
    assert _evaluation_spec(RunSettings())["image_size"] is None


def test_an_old_federated_head_with_dataset_n_on_a_manifest_still_evaluates(
    cwd: dict[str, str],
) -> None:
    """Heads exported before the fix recorded the run's dataset-n (2000) for the run's manifest."""
    write_site(Path("site.csv"), 30)
    write_site(Path("test.csv"), 10, start=100)
    _train(cwd, "site.csv", "head", loss="infonce")
    model, config = load_head("head")
    spec = DataSpec.from_dict({**config["data"], "n": 2000})
    run = RunSettings(dataset=spec.dataset, dataset_n=2000).to_dict()
    save_head("old-final", model, metadata={"run": run, "data": spec.to_dict()})
    metrics = _evaluate("--head", "old-final", "--data", "test.csv")
    assert metrics["num_test"] == 10 and metrics["num_train"] > 0
    assert _evaluate("--head", "old-final")["num_train"] == metrics["num_train"]
