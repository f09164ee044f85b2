"""Tests for common.data.images: PNG/JPEG/DICOM decoding and its error messages."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from common.data.dataset import ImageRef
from common.data.dicom_codecs import register_plugin
from common.data.images import file_key, is_dicom, read_image
from common.errors import DataError


def _testdata(name: str) -> Path:
    """A DICOM test file shipped with pydicom or pydicom-data (never downloaded)."""
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} missing: the Makefile installs pydicom-data"
    return Path(str(path))


@pytest.fixture()
def gray_u8() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(20, 30), dtype=np.uint8)


def test_png_grayscale_keeps_absolute_intensity(tmp_path: Path, gray_u8: np.ndarray) -> None:
    Image.fromarray(gray_u8).save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png")
    assert image.dtype == np.float32 and image.shape == (20, 30)
    np.testing.assert_allclose(image, gray_u8 / 255.0, atol=1e-6)


def test_png_16bit_is_divided_by_65535(tmp_path: Path) -> None:
    values = np.array([[0, 1000], [30000, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    np.testing.assert_allclose(read_image(tmp_path / "deep.png"), values / 65535.0, atol=1e-6)


def test_rgb_jpeg_and_rgba_png(tmp_path: Path) -> None:
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=95)
    image = read_image(tmp_path / "c.jpg")
    assert image.shape == (16, 16, 3)
    assert abs(float(image[..., 0].mean()) - 200 / 255) < 0.03 and float(image[..., 1].max()) < 0.05
    rgba = np.dstack([rgb, np.full((16, 16), 128, dtype=np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "d.png")
    assert read_image(tmp_path / "d.png").shape == (16, 16, 3)


def test_dicom_ct_applies_rescale_and_scales_to_unit_range() -> None:
    path = _testdata("CT_small.dcm")
    image = read_image(path)
    raw = pydicom.dcmread(path).pixel_array.astype(np.float64)
    assert image.shape == raw.shape and image.dtype == np.float32
    assert image.min() == 0.0 and image.max() == 1.0
    expected = (raw - raw.min()) / (raw.max() - raw.min())  # linear rescale, then min-max
    np.testing.assert_allclose(image, expected, atol=1e-5)


def test_dicom_window_is_applied(tmp_path: Path) -> None:
    dataset = pydicom.dcmread(_testdata("CT_small.dcm"))
    hounsfield = dataset.pixel_array * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    center = float(np.median(hounsfield))
    dataset.WindowCenter, dataset.WindowWidth = center, 40.0
    dataset.save_as(tmp_path / "windowed.dcm")
    image = read_image(tmp_path / "windowed.dcm")
    saturated = np.mean((image == 0.0) | (image == 1.0))
    assert saturated > 0.5  # a 40 HU window clips most of the CT
    assert float(image[hounsfield < center - 20].max()) == 0.0
    assert float(image[hounsfield > center + 20].min()) == 1.0


@pytest.mark.parametrize(
    "name",
    [
        "bad_sequence.dcm",  # CT, 12-bit, JPEG Lossless Process 14 (the usual CR/DX/CT export)
        "JPGExtended.dcm",  # NM, 12-bit, JPEG Extended (Process 4)
        "MR_small_jpeg_ls_lossless.dcm",  # MR, 16-bit signed, JPEG-LS
        "MR2_J2KR.dcm",  # MR, 12-bit, JPEG 2000 lossless
    ],
)
def test_deep_compressed_dicom_keeps_its_range_through_rescale_and_window(
    tmp_path: Path, name: str
) -> None:
    """The window is applied to the 12/16-bit values themselves: every stored level inside the
    window stays a level of its own (no 8-bit step before windowing)."""
    register_plugin()  # pixel_array below decodes through pydicom itself, before read_image does
    dataset = pydicom.dcmread(_testdata(name))
    stored = dataset.pixel_array.astype(np.float64)
    slope, intercept = 0.5, -100.0
    values = stored * slope + intercept
    center, width = (values.min() + values.max()) / 2, 0.9 * np.ptp(values)  # clips both ends
    dataset.RescaleSlope, dataset.RescaleIntercept = slope, intercept
    dataset.WindowCenter, dataset.WindowWidth = center, width
    dataset.save_as(tmp_path / name)  # the compressed pixel data is written back as it was
    assert pydicom.dcmread(tmp_path / name).file_meta.TransferSyntaxUID.is_compressed
    image = read_image(tmp_path / name)
    expected = np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    np.testing.assert_allclose(image, expected, atol=1e-6)
    inside = (expected > 0.0) & (expected < 1.0)
    levels = len(np.unique(stored[inside]))
    assert len(np.unique(image[inside])) == levels > 200


def test_dicom_monochrome1_is_inverted(tmp_path: Path) -> None:
    dataset = pydicom.dcmread(_testdata("CT_small.dcm"))
    dataset.PhotometricInterpretation = "MONOCHROME1"
    dataset.save_as(tmp_path / "mono1.dcm")
    normal = read_image(_testdata("CT_small.dcm"))
    np.testing.assert_allclose(read_image(tmp_path / "mono1.dcm"), 1.0 - normal, atol=1e-6)


def test_real_monochrome1_chest_radiograph_has_dark_lungs() -> None:
    image = read_image(_testdata("RG1_UNCR.dcm"))  # CR chest, MONOCHROME1
    height, width = image.shape
    lung = image[height // 3 : height // 2, width // 5 : width // 3]
    spine = image[height // 3 : height // 2, width // 2 - 20 : width // 2 + 20]
    assert float(lung.mean()) < float(spine.mean())


def test_multiframe_dicom_gives_middle_frame() -> None:
    path = _testdata("emri_small.dcm")
    frames = pydicom.dcmread(path).pixel_array
    image = read_image(path)
    middle = frames[len(frames) // 2].astype(np.float64)
    np.testing.assert_allclose(
        image, (middle - middle.min()) / (middle.max() - middle.min()), atol=1e-5
    )


def test_dicom_detected_by_preamble_without_suffix(tmp_path: Path) -> None:
    target = tmp_path / "IM0001"
    shutil.copy(_testdata("CT_small.dcm"), target)
    assert is_dicom(target)
    assert read_image(target).shape == (128, 128)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_image_names_path_and_context(
    tmp_path: Path, gray_u8: np.ndarray, suffix: str
) -> None:
    path = tmp_path / f"scan{suffix}"
    Image.fromarray(gray_u8).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=r"^site\.csv line 4: cannot decode image .*scan") as info:
        read_image(path, context="site.csv line 4")
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_truncated_dicom_and_dicom_without_pixels(tmp_path: Path) -> None:
    data = _testdata("CT_small.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) - 4000])
    with pytest.raises(DataError, match=r"cannot decode DICOM .*cut\.dcm"):
        read_image(tmp_path / "cut.dcm")
    with pytest.raises(DataError, match=r"cannot decode DICOM .*rtplan\.dcm.*no pixel data"):
        read_image(_testdata("rtplan.dcm"))


def test_missing_garbage_and_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"image file not found: .*nope\.png"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"cannot decode image .*junk\.png"):
        read_image(tmp_path / "junk.png")
    (tmp_path / "notes.dcm").write_text("hello")
    with pytest.raises(DataError, match=r"cannot decode DICOM .*notes\.dcm"):
        read_image(tmp_path / "notes.dcm")
    with pytest.raises(DataError, match="is a directory"):
        read_image(tmp_path)


def test_image_ref_load_prefixes_its_source(tmp_path: Path) -> None:
    ref = ImageRef(key="k", path=tmp_path / "gone.png", source="m.csv line 9 (id 'p1')")
    with pytest.raises(DataError, match=r"^m\.csv line 9 \(id 'p1'\): image file not found"):
        ref.load()


def test_file_key_is_content_hash(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"same")
    (tmp_path / "b.bin").write_bytes(b"same")
    (tmp_path / "c.bin").write_bytes(b"different")
    assert file_key(tmp_path / "a.bin") == file_key(tmp_path / "b.bin")
    assert file_key(tmp_path / "a.bin") != file_key(tmp_path / "c.bin")
