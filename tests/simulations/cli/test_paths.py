"""Every path a user types is resolved against the directory they typed it in, in every command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.errors import ConfigError
from simulations.cli.app import build_parser, main
from simulations.cli.federation import _federation_run_config
from simulations.cli.paths import run_config_paths
from tests.simulations.site_files import enter_workdir, link_encoders, write_site


@pytest.fixture()
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working directory holding data/site.csv (and its images), with its own home."""
    enter_workdir(tmp_path, monkeypatch)
    write_site(tmp_path / "data" / "site.csv", 12)
    return tmp_path


@pytest.mark.parametrize(
    ("argv", "paths"),
    [
        (
            ["train", "--data", "data/site.csv", "--out", "heads/a", "--cache-dir", "c"],
            {"data": "data/site.csv", "out": "heads/a", "cache_dir": "c"},
        ),
        (["embed", "--data", "./data/../data/site.csv"], {"data": "data/site.csv"}),
        (
            ["evaluate", "--head", "heads/a", "--data", "data/site.csv", "--json", "m.json"],
            {"head": "heads/a", "data": "data/site.csv", "json": "m.json"},
        ),
        (
            ["evaluate", "--head", "h", "--data", "data/site.csv", "--train-data", "data/site.csv"],
            {"train_data": "data/site.csv"},
        ),
        (
            ["simulate", "--data", "data/site.csv", "--out", "run"],
            {"data": "data/site.csv", "out": "run"},
        ),
        (["deploy-local", "--out", "d"], {"out": "d"}),
        (["demo", "--out", "demo"], {"out": "demo"}),
        (["audit", "sites/a"], {"site_dir": "sites/a"}),
    ],
)
def test_path_options_are_absolute_after_parsing(
    cwd: Path, argv: list[str], paths: dict[str, str]
) -> None:
    args = build_parser().parse_args(argv)
    for dest, typed in paths.items():
        assert getattr(args, dest) == str(cwd / typed), dest


def test_names_stay_names(cwd: Path, tiny_model_dirs: dict[str, Path]) -> None:
    (cwd / "minilm").mkdir()  # a directory named like a packaged encoder does not shadow it
    args = build_parser().parse_args(["train", "--data", "digits", "--text-encoder", "minilm"])
    assert args.data == "digits" and args.text_encoder == "minilm"
    assert args.image_encoder == "mobilenetv2" and args.cache_dir is None
    models = link_encoders(cwd, tiny_model_dirs)
    args = build_parser().parse_args(["embed", "--image-encoder", models["image"]])
    assert args.image_encoder == str(cwd / models["image"])
    args = build_parser().parse_args(["embed", "--image-encoder", "org/not-here"])
    assert args.image_encoder == "org/not-here"  # a Hugging Face id


def test_simulate_run_config_carries_absolute_paths(
    cwd: Path, tiny_model_dirs: dict[str, Path]
) -> None:
    models = link_encoders(cwd, tiny_model_dirs)
    write_site(cwd / "data" / "eval.csv", 6)
    args = build_parser().parse_args(
        [
            "simulate",
            "--data",
            "data/site.csv",
            "--text-encoder",
            models["text"],
            "--run-config",
            f'server-eval="data/eval.csv" run-dir="runs/x" image_encoder="{models["image"]}" '
            'strategy="fedprox"',
        ]
    )
    config = _federation_run_config(args)
    assert config["dataset"] == str(cwd / "data" / "site.csv")
    assert config["server-eval"] == str(cwd / "data" / "eval.csv")
    assert config["run-dir"] == str(cwd / "runs" / "x")
    assert config["text-encoder"] == str(cwd / models["text"])
    assert config["image_encoder"] == str(cwd / models["image"])
    assert config["strategy"] == "fedprox"


def test_run_config_paths_keep_names_and_empty_values(cwd: Path) -> None:
    values = {"dataset": "digits", "server-eval": "", "run-dir": "", "dataset-n": 5}
    assert run_config_paths(values, option="--run-config") == values


@pytest.mark.parametrize(
    "argv",
    [
        ["simulate", "--data", "data/missing.csv"],
        ["train", "--data", "data/missing.csv"],
        ["evaluate", "--head", "h", "--data", "data/missing.csv"],
        ["simulate", "--run-config", 'dataset="data/missing.csv"'],
    ],
)
def test_missing_manifest_is_one_line_naming_it_as_typed_and_resolved(
    cwd: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fedembed: error:")
    assert "data/missing.csv" in err and str(cwd / "data" / "missing.csv") in err


def test_experiment_set_resolves_dataset_paths(cwd: Path) -> None:
    from simulations.experiments.comparison_runs import main as experiment

    with pytest.raises(ConfigError, match=str(cwd / "data" / "missing.csv")):
        experiment(["--set", 'dataset="data/missing.csv"', "--no-federated", "--seeds", "0"])


@pytest.mark.slow
def test_simulate_a_relative_manifest_then_evaluate_the_head_on_a_test_file(
    cwd: Path, tiny_model_dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's two failures end to end: `simulate --data data/site.csv` through a real Flower
    simulation, then `evaluate --head <run>/final --data test.csv` (its dataset-n 2000 no longer
    applies to the manifest)."""
    write_site(cwd / "data" / "site.csv", 40)
    write_site(cwd / "test.csv", 9, start=100)
    models = link_encoders(cwd, tiny_model_dirs)
    argv = [
        "simulate",
        "--data",
        "data/site.csv",
        "--sites",
        "2",
        "--rounds",
        "1",
        "--local-epochs",
        "1",
        "--head",
        "small",
        "--image-encoder",
        models["image"],
        "--text-encoder",
        models["text"],
        "--encoder-image-size",
        "0",
        "--run-config",
        "batch-size=16",
        "--out",
        "fed",
    ]
    assert main(argv) == 0, capsys.readouterr()
    final = Path("fed") / "run" / "final"
    recorded = json.loads((final / "head.json").read_text())["data"]
    assert recorded["dataset"] == str(cwd / "data" / "site.csv") and recorded["n"] is None
    capsys.readouterr()
    assert main(["evaluate", "--head", str(final), "--data", "test.csv", "--json", "m.json"]) == 0
    metrics = json.loads((cwd / "m.json").read_text())
    assert metrics["num_test"] == 9 and 0 < metrics["num_train"] < 40
    assert metrics["fitted_on"] == (
        f"{cwd / 'data' / 'site.csv'}, the head's training split ({metrics['num_train']} rows)"
    )
    assert "| projected" in capsys.readouterr().out
