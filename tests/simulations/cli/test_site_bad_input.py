"""`fedembed embed` on a bad manifest, as a user runs it: one-line error, or skip-and-report.

The refusal runs as a real process (its whole stderr must be the one line); skip mode runs the same
entry point in this process (``main``), which spares a second interpreter importing torch and
transformers only to embed three rows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simulations.cli.app import main

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture()
def manifest(tmp_path: Path) -> Path:
    """Five rows; line 4's PNG is truncated and line 6's text is not UTF-8."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(images / f"{i}.png")
    cut = images / "2.png"
    cut.write_bytes(cut.read_bytes()[:200])
    path = tmp_path / "site.csv"
    rows = [f"p{i},images/{i}.png,there is a nodule {i}\n".encode() for i in range(5)]
    rows[4] = b"p4,images/4.png,caf\xe9 au lait\n"
    path.write_bytes(b"id,image,text\n" + b"".join(rows))
    return path


def _argv(manifest: Path, models: dict[str, Path], *extra: str) -> list[str]:
    return [
        "embed",
        "--data",
        str(manifest),
        "--image-encoder",
        str(models["image"]),
        "--text-encoder",
        str(models["text"]),
        "--cache-dir",
        str(manifest.parent / "cache"),
        *extra,
    ]


def _fedembed(
    manifest: Path, models: dict[str, Path], *extra: str
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "simulations.cli.app", *_argv(manifest, models, *extra)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "FEDEMBED_HOME": str(manifest.parent)}
    return subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_bad_manifest_exits_nonzero_with_one_line_naming_file_line_and_field(
    manifest: Path, tiny_model_dirs: dict[str, Path]
) -> None:
    result = _fedembed(manifest, tiny_model_dirs)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"fedembed: error: {manifest} line 6: field 'text'")
    assert "not valid UTF-8" in lines[0] and "Traceback" not in result.stderr
    assert not list((manifest.parent / "cache").glob("*/shards/*.npy"))


def test_skip_mode_prints_the_count_and_reasons_and_embeds_the_rest(
    manifest: Path,
    tiny_model_dirs: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("FEDEMBED_HOME", str(manifest.parent))
    for name, value in (
        ("HF_HUB_OFFLINE", "1"),
        ("TOKENIZERS_PARALLELISM", "false"),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
    ):  # main() sets these defaults in os.environ: undo them after the test
        monkeypatch.setenv(name, os.environ.get(name, value))
    code = main(_argv(manifest, tiny_model_dirs, "--on-bad-row", "skip"))
    result = capsys.readouterr()
    assert code == 0, result.err
    assert len(list((manifest.parent / "cache").glob("*/shards/*.npy"))) == 2  # image + text
    out = result.out.splitlines()
    assert out[0].startswith("3 examples embedded")
    assert "kept 3 rows, skipped 2 bad rows:" in out
    assert any(
        line.startswith("  line 4: (id 'p2') field 'image': cannot decode image") for line in out
    )
    assert any(line.startswith("  line 6: field 'text' is not valid UTF-8") for line in out)
    assert "Traceback" not in result.err
