"""Bad input at a site: every case is a DataError naming file, line and field, or a skipped row."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from common.config import DataSpec, SiteSettings
from common.data.manifest import read_manifest
from common.embedding import EmbeddedDataset, EmbedReport, embed_dataset
from common.encoders import Encoder, load_encoder
from common.errors import ConfigError, DataError

CLASSES = ["normal", "nodule"]
HEADER = "id,image,text,label\n"


@pytest.fixture(scope="module")
def encoders(tiny_model_dirs: dict[str, Path]) -> dict[str, Encoder]:
    return {
        "image": load_encoder(str(tiny_model_dirs["image"]), modality="image"),
        "text": load_encoder(str(tiny_model_dirs["text"]), modality="text"),
    }


@pytest.fixture()
def site(tmp_path: Path) -> Path:
    """Four good PNGs, a DICOM, and room for bad files."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(images / f"{i}.png")
    shutil.copy(str(get_testdata_file("CT_small.dcm")), images / "ct.dcm")
    return tmp_path


def _good_rows() -> list[str]:
    return [
        "p0,images/0.png,there is a small nodule,nodule\n",
        "p1,images/1.png,normal chest,normal\n",
        "p2,images/ct.dcm,left upper lobe opacity,\n",
        "p3,images/2.png,no effusion,normal\n",
    ]


def _truncate(path: Path, keep: int) -> str:
    path.write_bytes(path.read_bytes()[:keep])
    return path.name


def _png_cut(site: Path) -> str:
    shutil.copy(site / "images" / "3.png", site / "images" / "cut.png")
    _truncate(site / "images" / "cut.png", 300)
    return "b1,images/cut.png,a report,normal\n"


def _dicom_cut(site: Path) -> str:
    shutil.copy(site / "images" / "ct.dcm", site / "images" / "cut.dcm")
    _truncate(site / "images" / "cut.dcm", 20_000)  # header intact, pixel data cut
    return "b1,images/cut.dcm,a report,normal\n"


def _not_an_image(site: Path) -> str:
    (site / "images" / "notes.jpg").write_text("this is a text file, not a JPEG")
    return "b1,images/notes.jpg,a report,normal\n"


def _directory(site: Path) -> str:
    (site / "images" / "folder.png").mkdir()
    return "b1,images/folder.png,a report,normal\n"


# (case, bad row written after the 4 good rows -> line 6, field named, reason, found at embedding)
CSV_CASES: list[tuple[str, Callable[[Path], str], str, str, bool]] = [
    ("missing path", lambda s: "b1,images/nope.png,a report,normal\n", "image", "not found", False),
    ("directory as image", _directory, "image", "is a directory", False),
    ("empty image path", lambda s: "b1,,a report,normal\n", "image", "empty image path", False),
    ("duplicate id", lambda s: "p1,images/3.png,again,normal\n", "id", "duplicate id 'p1'", False),
    ("empty text", lambda s: 'b1,images/3.png,"  ",normal\n', "text", "empty text", False),
    ("empty id", lambda s: ",images/3.png,a report,normal\n", "id", "empty id", False),
    ("undeclared label", lambda s: "b1,images/3.png,a,tumour\n", "label", "not a declared", False),
    ("row cut short", lambda s: "b1,images/3.png,a rep\n", "label", "missing field", False),
    ("extra fields", lambda s: "b1,images/3.png,a, b,normal\n", "label", "extra value", False),
    ("truncated PNG", _png_cut, "image", "cannot decode image", True),
    ("truncated DICOM", _dicom_cut, "image", "cannot decode DICOM", True),
    ("not an image", _not_an_image, "image", "cannot decode image", True),
]


def _manifest(site: Path, bad: str) -> Path:
    path = site / "site.csv"
    path.write_text(HEADER + "".join(_good_rows()) + bad, encoding="utf-8")
    return path


def _load_and_embed(
    manifest: Path, encoders: dict[str, Encoder], cache: Path, on_bad_row: str = "raise"
) -> tuple[EmbeddedDataset, EmbedReport]:
    dataset = read_manifest(manifest, classes=CLASSES, on_error=on_bad_row).dataset
    return embed_dataset(
        dataset,
        cache_dir=cache,
        image_encoder=encoders["image"],
        text_encoder=encoders["text"],
        on_bad_row=on_bad_row,
        shard_size=2,  # the 4 good rows before the bad one would fill 2 shards if embedded first
    )


def _names_file_line_field(message: str, manifest: Path, line: int, field: str) -> None:
    assert message.startswith(f"{manifest} line {line}"), message
    assert f"field '{field}'" in message or f"column '{field}'" in message, message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("make_bad", "field", "reason", "at_embedding"),
    [case[1:] for case in CSV_CASES],
    ids=[case[0] for case in CSV_CASES],
)
def test_bad_csv_row_raises_naming_file_line_and_field(
    site: Path,
    encoders: dict[str, Encoder],
    make_bad: Callable[[Path], str],
    field: str,
    reason: str,
    at_embedding: bool,
) -> None:
    manifest = _manifest(site, make_bad(site))
    cache = site / "cache"
    with pytest.raises(DataError) as info:
        _load_and_embed(manifest, encoders, cache)
    _names_file_line_field(str(info.value), manifest, 6, field)
    assert reason in str(info.value)
    # An undecodable image is found when its batch is loaded (each image is decoded once): the
    # shards written before it hold the 4 good images only, valid for a re-run; no text yet.
    written = [
        key
        for meta in cache.glob("*/shards/*.json")
        for key in json.loads(meta.read_text(encoding="utf-8"))["keys"]
    ]
    assert len(written) == (4 if at_embedding else 0)
    if not at_embedding:  # the manifest reader itself names the row
        with pytest.raises(DataError, match=re.escape(f"{manifest} line 6")):
            read_manifest(manifest, classes=CLASSES)


def test_non_utf8_and_lone_surrogate_texts_name_line_and_field(site: Path) -> None:
    csv_manifest = site / "site.csv"
    csv_manifest.write_bytes(
        (HEADER + "".join(_good_rows())).encode() + b"b1,images/3.png,caf\xe9 au lait,normal\n"
    )
    with pytest.raises(DataError) as info:
        read_manifest(csv_manifest)
    _names_file_line_field(str(info.value), csv_manifest, 6, "text")
    assert "not valid UTF-8 (byte 0xe9 at character 4)" in str(info.value)
    report = read_manifest(csv_manifest, on_error="skip")
    assert [(s.row, s.id) for s in report.skipped] == [(6, "b1")] and len(report.dataset) == 4

    jsonl = site / "site.jsonl"
    rows = [{"id": "a", "text": "fine"}, {"id": "b", "text": "bad \ud800 text"}]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")  # JSON escape \ud800
    with pytest.raises(DataError) as info:
        read_manifest(jsonl)
    _names_file_line_field(str(info.value), jsonl, 2, "text")
    assert "lone surrogate U+D800" in str(info.value)


def test_missing_columns_name_file_header_and_field_even_in_skip_mode(site: Path) -> None:
    manifest = _manifest(site, "")
    with pytest.raises(DataError) as info:
        read_manifest(manifest, text_column="report", on_error="skip")
    _names_file_line_field(str(info.value), manifest, 1, "report")
    jsonl = site / "site.jsonl"
    jsonl.write_text('{"id": "a", "text": "x"}\n{"id": "b", "finding": "y"}\n')
    with pytest.raises(DataError, match=r"site\.jsonl line 2: missing field 'text'"):
        read_manifest(jsonl)
    with pytest.raises(DataError, match=r"site\.jsonl \(all rows\): no column 'label'"):
        read_manifest(jsonl, label_column="label")


def test_image_changed_after_the_manifest_was_read_is_not_embedded(
    site: Path, encoders: dict[str, Encoder]
) -> None:
    manifest = _manifest(site, "")
    dataset = read_manifest(manifest).dataset
    shutil.copy(site / "images" / "2.png", site / "images" / "0.png")  # p0 now shows p3's pixels
    with pytest.raises(DataError) as info:
        embed_dataset(dataset, cache_dir=site / "cache", image_encoder=encoders["image"])
    _names_file_line_field(str(info.value), manifest, 2, "image")
    assert "changed since the manifest was read" in str(info.value)


def test_skip_mode_reports_every_bad_row_and_embeds_the_good_ones_as_a_clean_manifest(
    site: Path, encoders: dict[str, Encoder]
) -> None:
    bad_rows = [make(site).replace("b1,", f"b{i},", 1) for i, (_, make, *_) in enumerate(CSV_CASES)]
    bad_rows[3] = "p1,images/3.png,again,normal\n"  # keep the duplicate id a duplicate
    good = _good_rows()
    mixed = [good[0], good[1], *bad_rows[:6], good[2], *bad_rows[6:], good[3]]
    manifest = site / "site.csv"
    manifest.write_text(HEADER + "".join(mixed), encoding="utf-8")
    embedded, report = _load_and_embed(manifest, encoders, site / "cache-mixed", "skip")

    bad_lines = [i + 2 for i, row in enumerate(mixed) if row not in good]
    assert sorted(s.row or 0 for s in report.skipped) == bad_lines
    assert len(report.skipped) == len(CSV_CASES) and report.kept == 4
    for skipped in report.skipped:
        field = re.search(r"field '(\w+)'", skipped.reason)
        assert field is not None and field.group(1) in {"id", "image", "text", "label"}, skipped
    lines = report.summary(limit=3)
    assert lines[0] == f"kept 4 rows, skipped {len(CSV_CASES)} bad rows:"
    assert lines[-1] == f"  ... and {len(CSV_CASES) - 3} more"

    clean = site / "clean.csv"
    clean.write_text(HEADER + "".join(good), encoding="utf-8")
    expected, clean_report = _load_and_embed(clean, encoders, site / "cache-clean")
    assert clean_report.skipped == [] and clean_report.summary() == []
    assert embedded.ids == expected.ids == ["p0", "p1", "p2", "p3"]
    assert embedded.image is not None and expected.image is not None
    assert embedded.text is not None and expected.text is not None
    np.testing.assert_array_equal(embedded.image, expected.image)
    np.testing.assert_array_equal(embedded.text, expected.text)
    assert embedded.labels is not None and expected.labels is not None
    assert embedded.labels.tolist() == expected.labels.tolist() == [1, 0, -1, 0]


def test_on_bad_row_setting_reaches_the_data_spec_and_is_validated() -> None:
    site = SiteSettings.from_node_config({"data": "site.csv", "on-bad-row": "skip"})
    from common.config import RunSettings

    assert site.data_spec(RunSettings()).on_bad_row == "skip"
    assert DataSpec.from_dict(DataSpec().to_dict()).on_bad_row == "raise"
    with pytest.raises(ConfigError, match=r"node-config: on-bad-row must be raise or skip"):
        SiteSettings.from_node_config({"on-bad-row": "ignore"})
    with pytest.raises(ConfigError, match="on-bad-row"):
        DataSpec(on_bad_row="warn")
