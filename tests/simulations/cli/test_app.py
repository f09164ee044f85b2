"""The `fedembed` command line: help, one-line errors, and the embed -> train -> evaluate workflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulations.cli.app import main
from tests.simulations.site_files import enter_workdir, link_encoders, write_site


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("embed", "train", "evaluate", "demo", "simulate", "deploy-local", "audit"):
        assert command in out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["embed", "--data", "no-such-dataset"], "unknown dataset 'no-such-dataset'"),
        (["embed", "--data", "missing/site.csv"], "missing/site.csv"),
        (["evaluate", "--head", "no/such/head"], "no saved head"),
        (["audit", "no/such/site"], "no audit log"),
        (["train", "--data", "digits", "--head", "huge"], "unknown head preset"),
    ],
)
def test_user_mistakes_are_one_line_errors(
    argv: list[str],
    expected: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    tiny_model_dirs: dict[str, Path],
) -> None:
    extra = ["--cache-dir", str(tmp_path)] if argv[0] in ("embed", "train") else []
    if argv[0] == "train":
        extra += [
            "--image-encoder",
            str(tiny_model_dirs["image"]),
            "--text-encoder",
            str(tiny_model_dirs["text"]),
        ]
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedembed: error:") and expected in err
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_embed_train_evaluate_workflow(
    tmp_path: Path, tiny_model_dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    data = ["--data", "digits", "--n", "200", "--cache-dir", str(tmp_path / "cache")]
    encoders = [
        "--image-encoder",
        str(tiny_model_dirs["image"]),
        "--text-encoder",
        str(tiny_model_dirs["text"]),
    ]
    assert main(["embed", *data, *encoders]) == 0
    out = capsys.readouterr().out
    assert "200 encoded now" in out and "  classes  10, declared" in out.splitlines()
    assert main(["embed", *data, *encoders]) == 0
    assert "200 from cache, 0 encoded now" in capsys.readouterr().out
    head = tmp_path / "head"
    assert (
        main(
            [
                "train",
                *data,
                *encoders,
                "--epochs",
                "3",
                "--loss",
                "supcon",
                "--head",
                "small",
                "--out",
                str(head),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| projected" in out and (head / "head.safetensors").exists()
    metrics = tmp_path / "metrics.json"
    assert (
        main(
            [
                "evaluate",
                "--head",
                str(head),
                "--cache-dir",
                str(tmp_path / "cache"),
                "--classifiers",
                "knn,logreg",
                "--json",
                str(metrics),
            ]
        )
        == 0
    )
    rows = {r["embeddings"]: r for r in json.loads(metrics.read_text())["rows"]}
    assert {"frozen", "projected"} <= set(rows) and "f1_knn" in rows["projected"]


@pytest.mark.parametrize("value", ["1", "1.5", "-0.1", "nan", "a fifth"])
def test_test_fraction_outside_0_1_is_one_line(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "--data", "digits", "--test-fraction", value]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"fedembed: error: --test-fraction {value}: must be a number in [0, 1) (0: hold nothing out)"
    )


def test_train_on_every_row_then_score_a_separate_test_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny_model_dirs: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    models = link_encoders(enter_workdir(tmp_path, monkeypatch), tiny_model_dirs)
    write_site(Path("data") / "train.csv", 30)
    write_site(Path("data") / "test.csv", 12, start=100)
    common = ["--cache-dir", "cache", "--image-encoder", models["image"]]
    common += ["--text-encoder", models["text"]]
    train = ["train", "--data", "data/train.csv", "--test-fraction", "0", "--out", "head"]
    assert main([*train, *common, "--epochs", "2", "--head", "small"]) == 0
    out = capsys.readouterr().out
    head = tmp_path / "head"
    assert "held-out split: none (test-fraction 0): all 30 rows train" in out
    assert "trained 2 epochs on 30 examples" in out
    assert f"head saved to {head}\n" in out
    assert f"no held-out rows: score with `fedembed evaluate --head {head} --data TEST.csv`" in out
    assert "|" not in out and "R@" not in out and "probe" not in out  # no metric it did not compute
    assert "metrics" not in json.loads((head / "head.json").read_text())
    assert main(["evaluate", "--head", "head", "--cache-dir", "cache"]) == 2
    assert "no held-out rows" in capsys.readouterr().err
    argv = ["evaluate", "--head", "head", "--data", "data/test.csv", "--cache-dir", "cache"]
    assert main([*argv, "--json", "m.json"]) == 0
    metrics = json.loads(Path("m.json").read_text())
    assert metrics["num_test"] == 12 and metrics["num_train"] == 30


def test_train_holds_out_the_rows_its_split_column_marks_test(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny_model_dirs: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    models = link_encoders(enter_workdir(tmp_path, monkeypatch), tiny_model_dirs)
    write_site(Path("site.csv"), 30, split=lambda k: "Test" if k % 5 == 0 else "train")
    argv = ["train", "--data", "site.csv", "--out", "head", "--cache-dir", "cache"]
    argv += ["--image-encoder", models["image"], "--text-encoder", models["text"]]
    assert main([*argv, "--epochs", "1", "--head", "small"]) == 0
    out = capsys.readouterr().out
    expected = "the 6 rows marked test in its split column (24 rows train; test-fraction not used)"
    assert f"held-out split: {expected}" in out
    assert f"scored: {tmp_path / 'site.csv'}, {expected}" in out
    assert "trained 1 epochs on 24 examples" in out and "| projected" in out


def test_cli_defaults_come_from_run_settings_train_config_and_the_demo(tmp_path: Path) -> None:
    from common.config import DataSpec, RunSettings, TrainConfig
    from simulations.cli.app import build_parser
    from simulations.cli.site import TRAIN_EPOCHS
    from simulations.experiments import demo

    parser = build_parser()
    run, train, data = RunSettings(), TrainConfig(), DataSpec()
    simulate = parser.parse_args(["simulate"])
    assert (simulate.rounds, simulate.local_epochs, simulate.strategy, simulate.loss) == (
        run.num_server_rounds,
        run.local_epochs,
        run.strategy,
        run.loss,
    )
    assert simulate.encoder_image_size == run.encoder_image_size
    trained = parser.parse_args(["train"])
    assert (trained.batch_size, trained.lr, trained.train_seed, trained.loss) == (
        train.batch_size,
        train.lr,
        train.seed,
        train.loss,
    )
    assert (trained.epochs, trained.test_fraction, trained.data) == (
        TRAIN_EPOCHS,
        data.test_fraction,
        data.dataset,
    )
    shown = parser.parse_args(["demo"])
    assert (shown.rounds, shown.sites, shown.n) == (demo.ROUNDS, demo.SITES, demo.EXAMPLES)
    manifest = tmp_path / "site.csv"
    manifest.write_text("id,text\n1,a\n", encoding="utf-8")
    compared = parser.parse_args(["compare", "--data", str(manifest)])
    assert compared.rounds == demo.ROUNDS
    assert compared.local_epochs == demo.TRAINING["local-epochs"]


def test_embed_says_whether_a_manifest_declares_its_classes(
    tmp_path: Path, tiny_model_dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = write_site(tmp_path / "site.csv", 6)
    argv = ["embed", "--data", str(manifest), "--cache-dir", str(tmp_path / "cache")]
    argv += ["--image-encoder", str(tiny_model_dirs["image"])]
    argv += ["--text-encoder", str(tiny_model_dirs["text"])]
    assert main(argv) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("  classes"))
    assert line.startswith("  classes  3, read from the labels: declare them in ")
    assert f"{manifest}.classes.json" in line
    Path(f"{manifest}.classes.json").write_text(
        json.dumps({"classes": ["normal", "nodule", "effusion"]})
    )
    assert main(argv) == 0
    assert "  classes  3, declared" in capsys.readouterr().out.splitlines()
