"""`fedembed cache prune`: a withdrawn patient's embeddings leave the cache and the site's bundle; the rest stays."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client import site as site_module
from client.site import load_site
from common.cache import EmbeddingCache
from common.config import RunSettings, SiteSettings
from common.data.dataset import text_key
from common.data.images import file_key
from simulations.cli.app import main
from tests.hospital_data import make_rows, write_manifest
from tests.tiny_config import tiny_encoders


def _cached_keys(cache: Path) -> list[str]:
    """Every key of every committed shard (a key cached under two encoders counts twice)."""
    return [
        key
        for index in sorted(cache.glob("*/shards/*.json"))
        for key in json.loads(index.read_text())["keys"]
    ]


def _encoders(tiny: dict[str, Path]) -> list[str]:
    return ["--image-encoder", str(tiny["image"]), "--text-encoder", str(tiny["text"])]


def _embed(manifest: str, tiny: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert main(["embed", "--data", manifest, "--cache-dir", "cache", *_encoders(tiny)]) == 0
    return capsys.readouterr().out


@pytest.fixture()
def two_manifests(
    tmp_path: Path,
    tiny_model_dirs: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> Path:
    """Hospital a (10 rows, with a site bundle) and b (4 rows) embedded into one cache ./cache."""
    monkeypatch.chdir(tmp_path)  # the paths below are typed relative to it
    write_manifest(tmp_path / "a" / "manifest.csv", make_rows(tmp_path / "a", 10))
    write_manifest(
        tmp_path / "b" / "manifest.csv", make_rows(tmp_path / "b", 4, prefix="q", start=12)
    )
    _embed("a/manifest.csv", tiny_model_dirs, capsys)
    _embed("b/manifest.csv", tiny_model_dirs, capsys)
    site_module._LOADED.clear()
    settings = SiteSettings.from_node_config(
        {
            "data": str(tmp_path / "a" / "manifest.csv"),
            "state-dir": str(tmp_path / "state"),
            "cache-dir": str(tmp_path / "cache"),
            "worker": "off",
        }
    )
    run = RunSettings.from_run_config(tiny_encoders(tiny_model_dirs))
    load_site(settings, run)
    return tmp_path


PRUNE = ["cache", "prune", "--cache-dir", "cache", "--state-dir", "state"]
KEEP_BOTH = ["--keep-data", "a/manifest.csv", "--keep-data", "b/manifest.csv"]


def test_prune_after_a_withdrawal_removes_that_row_and_keeps_the_rest(
    two_manifests: Path, tiny_model_dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    root = two_manifests
    manifest = root / "a" / "manifest.csv"
    rows = make_rows(root / "a", 10)  # the same files again: nothing changes on disk
    withdrawn = rows[3]
    write_manifest(manifest, [r for r in rows if r.id != withdrawn.id])
    gone = {file_key(root / "a" / withdrawn.image), text_key(withdrawn.text)}
    before = _cached_keys(root / "cache")
    assert gone <= set(before)
    (bundle,) = (root / "state" / "embeddings").glob("*.safetensors")

    capsys.readouterr()
    assert main([*PRUNE, *KEEP_BOTH, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove 2 entries" in out and "dry run: nothing was changed" in out
    assert f"site bundles in {root / 'state'}: would remove 1" in out
    assert _cached_keys(root / "cache") == before and bundle.exists()

    assert main([*PRUNE, *KEEP_BOTH]) == 0
    out = capsys.readouterr().out
    assert "removed 2 entries (2 shards rewritten" in out, out
    assert f"kept {len(before) - 2} entries" in out
    assert f"site bundles in {root / 'state'}: removed 1" in out  # built before the withdrawal
    after = _cached_keys(root / "cache")
    assert sorted(after) == sorted(k for k in before if k not in gone)
    assert not bundle.exists()
    assert EmbeddingCache(root / "cache").verify().ok

    for name in ("a", "b"):  # everything the kept manifests need is still cached
        out = _embed(f"{name}/manifest.csv", tiny_model_dirs, capsys)
        assert out.count(" 0 encoded now") == 3, out  # image, text and class prompts: all hits
    assert sorted(_cached_keys(root / "cache")) == sorted(after)


def test_a_manifest_left_out_loses_its_entries_and_a_current_bundle_stays(
    two_manifests: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = two_manifests
    before = _cached_keys(root / "cache")
    (bundle,) = (root / "state" / "embeddings").glob("*.safetensors")
    capsys.readouterr()
    assert main([*PRUNE, "--keep-data", "a/manifest.csv"]) == 0
    out = capsys.readouterr().out
    assert "removed 0 (0 bytes), kept 1" in out and bundle.exists()  # still current
    b_rows = make_rows(root / "b", 4, prefix="q", start=12)
    only_b = {file_key(root / "b" / r.image) for r in b_rows} | {text_key(r.text) for r in b_rows}
    after = _cached_keys(root / "cache")
    assert not only_b & set(after)
    assert set(after) == set(before) - only_b


def test_keep_encoder_drops_the_other_encoders_entries(
    two_manifests: Path, tiny_model_dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    root = two_manifests
    capsys.readouterr()
    argv = [*PRUNE, *KEEP_BOTH, "--keep-encoder", str(tiny_model_dirs["text"])]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "1 encoder directories deleted" in out, out
    (directory,) = [p for p in (root / "cache").iterdir() if p.is_dir()]
    identity = json.loads((directory / "encoder.json").read_text())["identity"]
    assert identity["modality"] == "text"
    assert "removed 1 (" in out  # the bundle also holds image embeddings


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--keep-data", "missing.csv"], "--keep-data missing.csv: no such manifest file"),
        (["--keep-data", "digits"], "--keep-data digits: not a manifest"),
        (["--keep-data", "a/manifest.csv", "--state-dir", "nowhere"], "no such directory"),
    ],
)
def test_mistakes_are_one_line_errors_and_remove_nothing(
    two_manifests: Path, extra: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _cached_keys(two_manifests / "cache")
    capsys.readouterr()
    assert main(["cache", "prune", "--cache-dir", "cache", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedembed: error:") and expected in err and len(err.splitlines()) == 1
    assert _cached_keys(two_manifests / "cache") == before
