"""`fedembed simulate` as a user runs it, when no site can contribute: refused before Flower starts
when the CLI can know it, else stopped by the coordinator with Flower's status finished:failed, a
non-zero exit and no final head."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.config import HOME_ENV
from simulations.cli.app import main

REPO = Path(__file__).resolve().parents[3]
# A cold `fedembed` process that refuses before starting Flower takes about 4 s here; a Flower
# simulation takes a minute. The bound leaves room for a loaded machine.
REFUSAL_SECONDS = 20.0


def write_unreadable_images(path: Path, rows: int = 8) -> Path:
    """A manifest the coordinator can read (its image files exist) whose images no site can decode."""
    images = path.parent / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = ["id,image,text,label"]
    for i in range(rows):
        (images / f"{i}.png").write_bytes(b"not a png at all")
        label = ("normal", "nodule")[i % 2]
        lines.append(f"p{i},images/{i}.png,there is a {label} in the left lung {i},{label}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_five_sites(path: Path) -> Path:
    """A text-only manifest whose site column has 5 values (A..E), 2 rows each."""
    rows = [f"r{i},report {i},{('normal', 'nodule')[i % 2]},{'ABCDE'[i % 5]}" for i in range(10)]
    path.write_text("id,text,label,site\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def _fedembed(cwd: Path, *argv: str) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {**os.environ, "PYTHONPATH": str(REPO), HOME_ENV: str(cwd)}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "simulations.cli.app", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return done, time.monotonic() - started


def _assert_refused_without_flower(
    done: subprocess.CompletedProcess[str], seconds: float, out: Path
) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    err = done.stderr.strip()
    assert err.startswith("fedembed: error: run-config: ") and len(err.splitlines()) == 1, err
    assert "Traceback" not in err and not done.stdout.strip()
    assert seconds < REFUSAL_SECONDS
    assert not (out / "flower").exists() and not (out / "logs").exists()  # no SuperLink, no run
    return err


def test_simulate_refuses_sample_level_dp_with_infonce_before_starting_flower(
    tmp_path: Path,
) -> None:
    argv = ["simulate", "--loss", "infonce", "--run-config", "dp-noise-multiplier=1.0"]
    done, seconds = _fedembed(tmp_path, *argv, "--out", "out")
    err = _assert_refused_without_flower(done, seconds, tmp_path / "out")
    assert "dp-noise-multiplier = 1.0 turns on sample-level DP" in err
    assert "loss 'infonce'" in err and "valid under sample-level DP: auto, proxy, prompts" in err


def test_simulate_refuses_a_site_column_of_five_values_for_four_sites_before_starting_flower(
    tmp_path: Path,
) -> None:
    manifest = write_five_sites(tmp_path / "five.csv")
    argv = ["simulate", "--data", "five.csv", "--partition", "site", "--sites", "4"]
    done, seconds = _fedembed(tmp_path, *argv, "--out", "out")
    err = _assert_refused_without_flower(done, seconds, tmp_path / "out")
    assert err == (
        f"fedembed: error: run-config: partition 'site' of {manifest}: its site column has 5 "
        "distinct values (A, B, C, D, E), but the run has 4 sites: each site takes one value's rows"
    )


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--strategy", "fedavgg"], "strategy 'fedavgg'"),
        (["--run-config", "num-rounds=2"], "unknown key 'num-rounds'"),
        (["--run-config", "dp-noise-multipler=1.0"], "unknown privacy key 'dp-noise-multipler'"),
        (["--run-config", "dp-poisson=false"], "Key 'dp-poisson' is not present"),
        (["--run-config", "max-empty-rounds=-1"], "max-empty-rounds must be >= 0"),
    ],
)
def test_unknown_names_are_refused_in_one_line_before_flower_starts(
    argv: list[str],
    named: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(HOME_ENV, str(tmp_path))
    assert main(["simulate", *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedembed: error: run-config:") and named in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "out" / "flower").exists()


def federation_argv(manifest: Path, tiny: dict[str, Path], *extra: str) -> list[str]:
    """2 sites, 2 rounds of 1 local epoch on ``manifest`` with the tiny encoders."""
    return [
        "--data",
        str(manifest),
        "--sites",
        "2",
        "--rounds",
        "2",
        "--local-epochs",
        "1",
        "--head",
        "small",
        "--image-encoder",
        str(tiny["image"]),
        "--text-encoder",
        str(tiny["text"]),
        "--encoder-image-size",
        "0",
        "--run-config",
        "batch-size=4",
        *extra,
    ]


def run_every_site_failing(
    command: str, home: Path, out: Path, tiny: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> int:
    """``fedembed COMMAND`` with ``home`` as fedembed's home, over a manifest no site can read."""
    monkeypatch.setenv(HOME_ENV, str(home))
    manifest = write_unreadable_images(home / "data" / "site.csv")
    return main([command, *federation_argv(manifest, tiny), "--out", str(out)])


def assert_failed_without_final_head(out: Path, printed: str) -> None:
    """Flower's verdict finished:failed, round 1 recorded with both sites' reasons, no final head."""
    assert "finished:failed" in printed and "final head:" not in printed
    assert (
        "round 1: 0 sites aggregated (head unchanged), 0 rejected, 0 declined, 2 failed" in printed
    )
    assert "failed: " in printed and "no site's update was aggregated" in printed
    run_dir = out / "run"
    assert not (run_dir / "final").exists()
    (entry,) = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert entry["round"] == 1 and entry["head_updated"] is False
    assert sorted(entry["outcomes"]) == ["site-0", "site-1"]
    for outcome in entry["outcomes"].values():  # each site's own reason: the image it cannot read
        assert outcome.startswith("failed: ") and "images/" in outcome, outcome


@pytest.mark.slow
def test_simulation_in_which_every_site_fails_exits_nonzero_with_flower_status_failed(
    tmp_path: Path,
    tiny_model_dirs: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "fed"
    assert run_every_site_failing("simulate", tmp_path, out, tiny_model_dirs, monkeypatch) == 1
    assert_failed_without_final_head(out, capsys.readouterr().out)
