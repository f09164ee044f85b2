"""Tests for common.data.manifest: CSV/JSONL site manifests, class declarations and every error."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from common.data.manifest import default_prompt, load_manifest, read_manifest
from common.errors import ConfigError, DataError


@pytest.fixture()
def site(tmp_path: Path) -> Path:
    """A site directory with a PNG, a JPEG and a real DICOM (pydicom's CT_small.dcm)."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (24, 24), dtype=np.uint8)).save(images / "a.png")
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(images / "b.jpg")
    shutil.copy(str(get_testdata_file("CT_small.dcm")), images / "c.dcm")
    return tmp_path


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _csv(site: Path, rows: str, header: str = "id,image,text,label") -> Path:
    return _write(site / "site.csv", header + "\n" + rows)


GOOD_ROWS = (
    "p1,images/a.png,Normal chest.,normal\n"
    'p2,images/b.jpg,"Cardiomegaly, mild.",cardiomegaly\n'
    "p3,images/c.dcm,Small nodule.,nodule\n"
)


def test_csv_happy_path_with_png_jpeg_dicom(site: Path) -> None:
    dataset = load_manifest(_csv(site, GOOD_ROWS))
    assert dataset.name == "site" and dataset.ids == ["p1", "p2", "p3"]
    assert dataset.texts == ["Normal chest.", "Cardiomegaly, mild.", "Small nodule."]
    assert dataset.class_names == ["cardiomegaly", "nodule", "normal"]  # sorted labels
    assert dataset.prompts == [default_prompt(c) for c in dataset.class_names]
    assert dataset.labels is not None and dataset.labels.tolist() == [2, 0, 1]
    assert dataset.images is not None and dataset.sites is None
    shapes = [ref.load().shape for ref in dataset.images]
    assert shapes == [(24, 24), (24, 24, 3), (128, 128)]
    assert dataset.images[0].path == site / "images" / "a.png"
    assert len({ref.key for ref in dataset.images}) == 3


def test_jsonl_happy_path_absolute_paths_sites_and_unlabelled(site: Path) -> None:
    rows = [
        {
            "image": str(site / "images" / "a.png"),
            "text": "Clear lungs.",
            "label": "normal",
            "site": "A",
        },
        {"image": "images/c.dcm", "text": "Opacity.", "label": None, "site": "B"},
        {"image": "images/b.jpg", "text": "Effusion.", "site": "B", "extra": 3},
    ]
    manifest = _write(site / "data.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    dataset = load_manifest(manifest)
    assert dataset.ids == ["1", "2", "3"]  # default id: the line number
    assert dataset.sites == ["A", "B", "B"]
    assert dataset.labels is not None and dataset.labels.tolist() == [0, -1, -1]
    assert dataset.class_names == ["normal"]


def test_text_only_manifest_and_custom_column_names(site: Path) -> None:
    manifest = _csv(site, "r1,First note.,x\nr2,Second note.,y\n", header="case,report,finding")
    dataset = load_manifest(
        manifest, id_column="case", text_column="report", label_column="finding"
    )
    assert dataset.modalities == ("text",) and dataset.ids == ["r1", "r2"]
    assert dataset.class_names == ["x", "y"]


def test_image_only_manifest(site: Path) -> None:
    dataset = load_manifest(_csv(site, "images/a.png\nimages/b.jpg\n", header="image"))
    assert dataset.modalities == ("image",) and dataset.ids == ["2", "3"]


def test_sidecar_declares_classes_and_prompts(site: Path) -> None:
    manifest = _csv(site, GOOD_ROWS)
    declared = {
        "classes": ["normal", "nodule", "cardiomegaly", "effusion"],
        "prompts": ["n", "o", "c", "e"],
    }
    undeclared = load_manifest(manifest)  # loaded before the sidecar exists: the rows' labels
    assert undeclared.class_names == ["cardiomegaly", "nodule", "normal"]
    assert not undeclared.classes_declared and not undeclared.subset([0]).classes_declared
    _write(site / "site.csv.classes.json", json.dumps(declared))
    dataset = load_manifest(manifest)
    assert dataset.class_names == declared["classes"] and dataset.prompts == declared["prompts"]
    assert dataset.labels is not None and dataset.labels.tolist() == [0, 2, 1]
    assert dataset.classes_declared and dataset.subset([0]).classes_declared


def test_stem_sidecar_without_prompts_and_classes_argument(site: Path) -> None:
    manifest = _csv(site, GOOD_ROWS)
    _write(
        site / "site.classes.json", json.dumps({"classes": ["nodule", "normal", "cardiomegaly"]})
    )
    dataset = load_manifest(manifest)
    assert dataset.class_names == ["nodule", "normal", "cardiomegaly"]
    assert dataset.prompts == [default_prompt(c) for c in dataset.class_names]
    overridden = load_manifest(
        manifest, classes=["normal", "nodule", "cardiomegaly", "x"], prompts=list("abcd")
    )
    assert overridden.class_names[-1] == "x" and overridden.prompts == list("abcd")


def test_default_prompt() -> None:
    assert default_prompt("pleural_effusion") == "a report describing pleural effusion"


def test_label_outside_declared_classes(site: Path) -> None:
    manifest = _csv(site, GOOD_ROWS)
    with pytest.raises(
        DataError,
        match=r"site\.csv line 4: label 'nodule' in field 'label' is not a declared class",
    ):
        load_manifest(manifest, classes=["normal", "cardiomegaly"])
    report = read_manifest(manifest, classes=["normal", "cardiomegaly"], on_error="skip")
    assert report.dataset.ids == ["p1", "p2"] and [s.row for s in report.skipped] == [4]


def test_missing_column_names_file_column_and_found_columns(site: Path) -> None:
    manifest = _csv(site, GOOD_ROWS)
    with pytest.raises(
        DataError,
        match=r"site\.csv line 1 \(header\): no column 'report' \(the text column\); "
        r"columns found: id, image, text, label",
    ):
        load_manifest(manifest, text_column="report")
    no_content = _csv(site, "p1,normal\n", header="id,label")
    with pytest.raises(
        DataError, match=r"site\.csv line 1 \(header\): needs an image column .* found: id, label"
    ):
        load_manifest(no_content)


def test_empty_text_names_file_line_and_field(site: Path) -> None:
    manifest = _csv(site, 'p1,images/a.png,"   ",normal\np2,images/b.jpg,ok,normal\n')
    with pytest.raises(DataError, match=r"site\.csv line 2: empty text in field 'text'"):
        load_manifest(manifest)


def test_missing_image_names_file_line_and_path(site: Path) -> None:
    manifest = _csv(site, GOOD_ROWS + "p4,images/missing.png,text,normal\n")
    with pytest.raises(
        DataError,
        match=r"site\.csv line 5: image file not found \(field 'image'\): .*images/missing\.png",
    ):
        load_manifest(manifest)


def test_non_utf8_names_file_line_and_field(site: Path) -> None:
    manifest = site / "site.csv"
    manifest.write_bytes(b"id,text\np1,fine\np2,caf\xe9 au lait\n")
    with pytest.raises(
        DataError,
        match=r"site\.csv line 3: field 'text' is not valid UTF-8 \(byte 0xe9 at character 4\)",
    ):
        load_manifest(manifest)


def test_utf8_bom_is_accepted(site: Path) -> None:
    manifest = site / "site.csv"
    manifest.write_bytes("id,text\np1,Pleural effusion \u2013 small.\n".encode("utf-8-sig"))
    assert load_manifest(manifest).ids == ["p1"]


def test_malformed_jsonl_line(site: Path) -> None:
    manifest = _write(
        site / "data.jsonl",
        '{"text": "ok"}\n{"text": "broken"\n["not", "object"]\n{"text": "fine"}\n',
    )
    with pytest.raises(DataError, match=r"data\.jsonl line 2: malformed JSON"):
        load_manifest(manifest)
    report = read_manifest(manifest, on_error="skip")
    assert report.dataset.ids == ["1", "4"]
    assert [(s.row, s.reason.split(" (")[0]) for s in report.skipped] == [
        (2, "malformed JSON"),
        (3, "expected a JSON object, got list"),
    ]


def test_jsonl_wrong_types_and_missing_field(site: Path) -> None:
    manifest = _write(
        site / "data.jsonl",
        '{"text": "a", "label": "x"}\n{"text": 5}\n{"label": "x"}\n{"text": "b", "label": [1]}\n',
    )
    report = read_manifest(manifest, on_error="skip")
    reasons = {s.row: s.reason for s in report.skipped}
    assert reasons[2] == "field 'text' must be a string, got JSON int"
    assert reasons[3] == "missing field 'text'"
    assert reasons[4] == "field 'label' must be a class name, got JSON list"


def test_duplicate_ids(site: Path) -> None:
    manifest = _csv(site, GOOD_ROWS + "p2,images/a.png,Again.,normal\n")
    with pytest.raises(
        DataError, match=r"site\.csv line 5: duplicate id 'p2' in field 'id' \(first at line 3\)"
    ):
        load_manifest(manifest)


def test_csv_extra_fields_and_multiline_text_line_numbers(site: Path) -> None:
    rows = 'p1,images/a.png,"Line one\nline two",normal\np2,images/b.jpg,no quotes, here,normal\np3,images/c.dcm,,normal\n'
    manifest = _csv(site, rows)
    report = read_manifest(manifest, on_error="skip")
    assert report.dataset.ids == ["p1"] and report.dataset.texts == ["Line one\nline two"]
    assert [s.row for s in report.skipped] == [4, 5]  # p1 spans lines 2-3
    assert "5 fields but the header has 4" in report.skipped[0].reason
    assert report.skipped[1].reason == "empty text in field 'text'"
    assert "skipped 2" in report.summary() and "line 4:" in report.summary()


def test_skip_mode_logs_and_all_bad_rows_raise(
    site: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manifest = _csv(site, GOOD_ROWS + "p4,images/nope.png,x,normal\n")
    with caplog.at_level(logging.WARNING):
        dataset = load_manifest(manifest, on_error="skip")
    assert len(dataset) == 3 and "skipped 1" in caplog.text and "line 5" in caplog.text
    all_bad = _csv(site, "p1,images/nope.png,x,normal\n")
    with pytest.raises(
        DataError,
        match=r"site\.csv: no usable rows \(1 skipped; first: line 2: image file not found",
    ):
        load_manifest(all_bad, on_error="skip")


def test_empty_manifest_and_bad_arguments(site: Path) -> None:
    with pytest.raises(DataError, match="empty manifest"):
        load_manifest(_write(site / "empty.csv", "\n\n"))
    with pytest.raises(DataError, match=r"header\.csv: no data rows"):
        load_manifest(_write(site / "header.csv", "id,text\n"))
    with pytest.raises(DataError, match="manifest not found"):
        load_manifest(site / "absent.csv")
    with pytest.raises(DataError, match=r"unsupported manifest format '\.tsv'"):
        load_manifest(_write(site / "x.tsv", "id\ttext\n"))
    with pytest.raises(ConfigError, match="on_error"):
        load_manifest(_csv(site, GOOD_ROWS), on_error="ignore")


def test_bad_sidecar_names_the_sidecar_and_field(site: Path) -> None:
    manifest = _csv(site, GOOD_ROWS)
    sidecar = _write(
        site / "site.csv.classes.json", json.dumps({"classes": ["a", "b"], "prompts": ["only one"]})
    )
    with pytest.raises(
        DataError, match=r"site\.csv\.classes\.json: field 'prompts': expected a list of 2 prompts"
    ):
        load_manifest(manifest)
    sidecar.write_text(json.dumps({"classes": ["a", "a"]}))
    with pytest.raises(DataError, match=r"field 'classes': duplicate class names a"):
        load_manifest(manifest)
    sidecar.write_text("{not json")
    with pytest.raises(DataError, match=r"site\.csv\.classes\.json: not a valid UTF-8 JSON file"):
        load_manifest(manifest)


def test_corrupt_image_found_on_load_not_when_read(site: Path) -> None:
    png = site / "images" / "a.png"
    png.write_bytes(png.read_bytes()[:60])
    dataset = load_manifest(_csv(site, GOOD_ROWS))  # existence is checked, content is not
    assert dataset.images is not None
    with pytest.raises(
        DataError, match=r"site\.csv line 2 \(id 'p1'\) field 'image': cannot decode image .*a\.png"
    ):
        dataset.images[0].load()


def test_split_column_marks_test_rows_any_case_and_empty_is_train(site: Path) -> None:
    path = _write(
        site / "split.csv",
        "id,text,label,split\np1,Normal.,normal,train\np2,Big heart.,cardiomegaly,TEST\n"
        "p3,Clear.,normal,\n",
    )
    dataset = load_manifest(path)
    assert dataset.splits == ["train", "test", "train"]
    assert dataset.subset([1, 2]).splits == ["test", "train"]
    assert load_manifest(_csv(site, GOOD_ROWS)).splits is None


def test_unknown_split_value_names_file_line_and_field(site: Path) -> None:
    path = _write(site / "split.csv", "id,text,split\np1,Normal.,train\np2,Heart.,holdout\n")
    with pytest.raises(DataError, match=r"split\.csv line 3: split 'holdout' in field 'split'"):
        load_manifest(path)
    report = read_manifest(path, on_error="skip")
    assert report.dataset.ids == ["p1"] and report.skipped[0].row == 3
