"""The `fedembed` command line: help, one-line errors, and the embed -> train -> evaluate workflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulations.cli import main


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
    assert "200 encoded now" in capsys.readouterr().out
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
