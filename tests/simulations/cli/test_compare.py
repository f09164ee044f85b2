"""`fedembed compare` as a hospital's engineer runs it: relative paths from their own directory,
a manifest with site and split columns, every refusal one line before any encoder or Flower."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simulations.cli.app import main
from tests.simulations.site_files import enter_workdir, link_encoders

FINDINGS = ("normal", "nodule", "effusion")
REPORTS = {
    "normal": "normal heart and lung",
    "nodule": "there is a small nodule in the {side} lobe",
    "effusion": "large pleural effusion {side}",
}


def write_manifest(
    path: Path,
    sites: dict[str, int],
    *,
    test_every: int = 0,
    columns: tuple[str, ...] = ("id", "image", "text", "label", "site", "split"),
    edit: Callable[[int, dict[str, str]], None] | None = None,
) -> Path:
    """A CSV of ``sites[name]`` rows per site (16x16 PNGs beside it); every ``test_every``-th row
    of a site is marked split=test. ``edit(k, row)`` may change row k's cells before writing."""
    (path.parent / "images").mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        k = 0
        for site, count in sites.items():
            for j in range(count):
                label = FINDINGS[j % len(FINDINGS)]
                row_id = f"{path.stem}-{k}"
                image = path.parent / "images" / f"{row_id}.png"
                rng = np.random.default_rng(k)
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(image)
                marked = bool(test_every) and j % test_every == test_every - 1
                row = {
                    "id": row_id,
                    "image": f"images/{row_id}.png",
                    "text": REPORTS[label].format(side=("left", "right")[j % 2]),
                    "label": label,
                    "site": site,
                    "split": "test" if marked else "train",
                }
                if edit is not None:
                    edit(k, row)
                writer.writerow([row[c] for c in columns])
                k += 1
    return path


@pytest.fixture()
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The engineer's working directory (its own $FEDEMBED_HOME); every path below is relative."""
    return enter_workdir(tmp_path, monkeypatch)


@pytest.fixture()
def models(cwd: Path, tiny_model_dirs: dict[str, Path]) -> list[str]:
    """The tiny encoders as relative model directories, with the options the tiny ViT needs."""
    relative = link_encoders(cwd, tiny_model_dirs)
    return [
        "--image-encoder",
        relative["image"],
        "--text-encoder",
        relative["text"],
        "--run-config",
        'encoder-image-size=0 batch-size=16 head="small"',
    ]


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text(encoding="utf-8"))


def _marked(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as handle:
        return [row["id"] for row in csv.DictReader(handle) if row["split"] == "test"]


@pytest.mark.slow
def test_compare_scores_every_arm_once_on_the_rows_marked_test(
    cwd: Path, models: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Two hospitals, 24 rows each, every 4th marked test: a real Flower federation (1 round);
    every arm is scored on exactly the 12 marked rows, which no site trained or stopped on."""
    write_manifest(cwd / "data" / "consortium.csv", {"north": 24, "south": 24}, test_every=4)
    argv = ["compare", "--data", "data/consortium.csv", "--rounds", "1", "--local-epochs", "1"]
    assert main([*argv, *models, "--out", "results"]) == 0
    out = capsys.readouterr().out
    marked = _marked(cwd / "data" / "consortium.csv")
    assert len(marked) == 12
    # The plan, before anything runs: sites by name, their rows, the test set.
    assert "over 2 sites: one site per value of its 'site' column" in out
    assert "  site 0 (north): 15 rows train, 3 validation, 6 test" in out
    assert "test set: the 12 rows of consortium.csv marked split=test, pooled over the sites" in out
    # The table, the ratios and what a hospital gains.
    assert "| method" in out and "federated (fedavg, 1 rounds)" in out
    assert "\nfederated / centralized: " in out
    assert "what a hospital gains by federating: federated mean_R@5 " in out
    assert "site 0 (north) " in out.split("what a hospital gains")[1].splitlines()[0]
    results = _results(cwd / "results")
    assert sorted(results["test_set"]["ids"]) == sorted(marked)
    assert results["test_set"]["rows"] == 12
    # Each site trains and stops on its 18 unmarked rows only; its own 6 marked rows are its
    # per-site test rows (the plan printed exactly what the sites did).
    for site in results["sites"]:
        assert site["train"] + site["validation"] == 18 and site["test"] == 6
    assert [s["names"] for s in results["sites"]] == [["north"], ["south"]]
    assert set(results["per_site"]) == {"site 0", "site 1"}
    assert set(results["ratios"]) >= {"mean_R@5"}
    assert results["run"]["test_rows"] == "exclude"
    assert results["run"]["dataset"] == str(cwd / "data" / "consortium.csv")
    figures = sorted(p.name for p in (cwd / "results").glob("*.png"))
    assert figures == ["site_metric_vs_round.png", "site_per_site.png"]
    markdown = (cwd / "results" / "results.md").read_text(encoding="utf-8")
    assert markdown.startswith("| method") and "federated / centralized: " in markdown
    assert "![site_per_site](site_per_site.png)" in markdown


def test_test_data_file_is_the_common_test_set(
    cwd: Path, models: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """--test-data: every row of the file scores every arm, its labels read with the training
    manifest's classes (it has no sidecar and fewer classes); no Flower run here (--no-federated)."""
    data = write_manifest(cwd / "consortium.csv", {"north": 15, "south": 15})
    classes = {"classes": list(FINDINGS), "prompts": [f"a chest x-ray: {c}" for c in FINDINGS]}
    Path(f"{data}.classes.json").write_text(json.dumps(classes), encoding="utf-8")

    def only_two_findings(k: int, row: dict[str, str]) -> None:
        if row["label"] == "effusion":
            row["label"], row["text"] = "nodule", "there is a small nodule in the left lobe"

    write_manifest(cwd / "external" / "held.csv", {"south": 5, "east": 4}, edit=only_two_findings)
    argv = ["compare", "--data", "consortium.csv", "--test-data", "external/held.csv"]
    options = ["--rounds", "2", "--local-epochs", "1", "--no-federated"]
    assert main([*argv, *options, *models, "--out", "res"]) == 0
    out = capsys.readouterr().out
    assert f"test set: every row of {cwd / 'external' / 'held.csv'} (9 rows)" in out
    results = _results(cwd / "res")
    assert sorted(results["test_set"]["ids"]) == sorted(f"held-{k}" for k in range(9))
    assert results["test_set"]["rows"] == 9
    # The sites keep all their rows (12 train + 3 validation each); only south has test rows.
    assert [(s["train"], s["validation"], s["test"]) for s in results["sites"]] == [
        (12, 3, 0),
        (12, 3, 5),
    ]
    assert list(results["per_site"]) == ["site 1"]
    assert results["ratios"] == {}  # no federated arm
    assert "federated / centralized" not in out and "| centralized (pooled" in out


def _refusal(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the command; it must exit 2 with one line, fast, before any encoder or Flower."""
    from common.pipeline import _cached_encoder

    loaded = _cached_encoder.cache_info().currsize
    started = time.perf_counter()
    code = main(["compare", *argv, "--out", "res"])
    seconds = time.perf_counter() - started
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedembed: error: "), captured.err
    assert _cached_encoder.cache_info().currsize == loaded  # no encoder loaded
    assert not Path("res").exists()  # compare() never started: no Flower run, no cache
    assert seconds < 20
    return lines[0].removeprefix("fedembed: error: ")


TWO_SITES = {"north": 12, "south": 12}


def _label_x_on_line_5(k: int, row: dict[str, str]) -> None:
    if k == 3:
        row["label"] = "pneumonia"


def _bad_split_on_line_4(k: int, row: dict[str, str]) -> None:
    if k == 2:
        row["split"] = "validation"


def _south_all_test(k: int, row: dict[str, str]) -> None:
    if row["site"] == "south":
        row["split"] = "test"


@pytest.mark.parametrize(
    ("make", "argv", "expected"),
    [
        (None, ["--data", "missing.csv"], "--data missing.csv: no such manifest file"),
        (
            lambda d: write_manifest(d / "c.csv", TWO_SITES),
            ["--data", "c.csv", "--test-data", "t.csv"],
            "--test-data t.csv: no such manifest file",
        ),
        (
            lambda d: write_manifest(d / "c.csv", TWO_SITES, edit=_bad_split_on_line_4),
            ["--data", "c.csv"],
            "c.csv line 4: split 'validation' in field 'split' is not train or test",
        ),
        (
            lambda d: write_manifest(d / "c.csv", TWO_SITES, columns=("id", "image", "text")),
            ["--data", "c.csv"],
            "c.csv: no 'site' column (the hospital of each row), which --partition site needs",
        ),
        (
            lambda d: write_manifest(d / "c.csv", TWO_SITES),
            ["--data", "c.csv", "--sites", "3"],
            "--sites 3: ",
        ),
        (
            lambda d: write_manifest(d / "c.csv", TWO_SITES, columns=("image", "text", "label")),
            ["--data", "c.csv", "--partition", "iid"],
            "--partition iid needs --sites N",
        ),
        (
            lambda d: write_manifest(d / "c.csv", {"north": 20}),
            ["--data", "c.csv"],
            "has one site in its 'site' column (north): a comparison needs at least 2 sites",
        ),
        (
            lambda d: write_manifest(d / "c.csv", TWO_SITES, edit=_south_all_test),
            ["--data", "c.csv"],
            "c.csv: site 1 (south) (12 rows) has no row to train on: all are marked test",
        ),
        (
            lambda d: write_manifest(d / "c.csv", {"north": 30, "south": 3}),
            ["--data", "c.csv"],
            "c.csv: site 1 (south) (3 rows) leaves no validation row to stop training on",
        ),
        (
            lambda d: (
                write_manifest(d / "c.csv", TWO_SITES, edit=_label_x_on_line_5),
                (d / "c.csv.classes.json").write_text(
                    '{"classes": ["normal", "nodule", "effusion"]}'
                ),
            ),
            ["--data", "c.csv"],
            "c.csv line 5: label 'pneumonia' in field 'label' is not a declared class",
        ),
        (
            lambda d: (
                write_manifest(d / "c.csv", TWO_SITES),
                write_manifest(d / "t.csv", {"x": 4}, columns=("id", "text", "label")),
            ),
            ["--data", "c.csv", "--test-data", "t.csv"],
            "t.csv: has text, ",
        ),
        (
            lambda d: (
                write_manifest(d / "c.csv", TWO_SITES),
                write_manifest(d / "t.csv", {"x": 4}, edit=_label_x_on_line_5),
            ),
            ["--data", "c.csv", "--test-data", "t.csv"],
            "t.csv line 5: label 'pneumonia' in field 'label' is not a declared class",
        ),
        (
            lambda d: (
                write_manifest(d / "c.csv", TWO_SITES, test_every=4),
                write_manifest(d / "t.csv", {"x": 4}),
            ),
            ["--data", "c.csv", "--test-data", "t.csv"],
            "marks 6 rows split=test and --test-data names another test set",
        ),
        (
            lambda d: write_manifest(d / "c.csv", TWO_SITES),
            ["--data", "c.csv", "--run-config", 'loss="supcon"'],
            "--run-config loss: set by --loss",
        ),
        (
            lambda d: write_manifest(d / "c.csv", TWO_SITES, columns=("image", "text", "site")),
            ["--data", "c.csv", "--loss", "supcon"],
            "--loss supcon: needs labels",
        ),
        (
            lambda d: write_manifest(
                d / "c.csv", TWO_SITES, edit=lambda k, row: row.update(label="normal")
            ),
            ["--data", "c.csv", "--loss", "proxy"],
            "--loss proxy: needs at least 2 classes; ",
        ),
        (
            lambda d: write_manifest(d / "c.csv", TWO_SITES),
            ["--data", "c.csv", "--image-encoder", "models/missing-vit"],
            "--image-encoder models/missing-vit: no model directory",
        ),
    ],
)
def test_every_refusal_is_one_line_before_any_encoder_or_flower(
    cwd: Path,
    make: Callable[[Path], object] | None,
    argv: list[str],
    expected: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if make is not None:
        make(cwd)
    message = _refusal(argv, capsys)
    assert expected in message, message
    assert "Traceback" not in message


def test_check_prints_the_plan_and_trains_nothing(
    cwd: Path, models: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    write_manifest(
        cwd / "c.csv", {"a": 10, "b": 20, "c": 10}, columns=("image", "text", "label", "site")
    )
    assert (
        main(
            ["compare", "--data", "c.csv", "--partition", "iid", "--sites", "2", *models, "--check"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "c.csv (40 rows; 3 classes) over 2 sites: rows split at random (iid)" in out
    assert "loss auto (the demo's: labelled image-text pairs), 20 rounds x 8" in out
    assert "test set: no row of c.csv is marked split=test" in out
    assert out.rstrip().endswith("check passed: nothing trained (run again without --check)")
    assert not Path("runs").exists()
