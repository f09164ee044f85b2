"""Every compressed DICOM that pydicom's test data ships decodes through a site manifest.

The files are enumerated from pydicom.data (with pydicom-data's larger ones), so a newly shipped
one is covered. Lossless syntaxes must equal their uncompressed references pixel for pixel, lossy
ones must come within a tolerance; ``fedembed embed`` over a manifest of them gives each lossless
file the embedding of its uncompressed twin.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.data.data_manager import DATA_ROOT, DataTypes, external_data_sources
from pydicom.dataelem import RawDataElement
from pydicom.encaps import encapsulate
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.uid import (
    HEVCMP51,
    JPEG2000,
    UID,
    HTJ2KLossless,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from common.config import DataSpec
from common.data.dicom_codecs import PLUGIN, register_plugin
from common.data.images import read_image
from common.data.manifest import read_manifest
from common.errors import DataError
from common.pipeline import embed_site
from simulations.cli.app import main

REPO = Path(__file__).resolve().parents[2]
# A lossy file against a decompressed copy of the same instance made by another tool (dcmtk,
# the WG04 authors): colour conversion and IDCT rounding, up to 3 of 255 levels.
SAME_INSTANCE_ATOL = 3 / 255 + 1e-6
# A lossy file against its series' uncompressed original: mean absolute error in [0, 1] units.
ORIGINAL_MEAN_ERROR = 0.03
# Equal pixels, embedded in different batches.
EMBEDDING_ATOL = 1e-5
# Shipped broken on purpose (pydicom's test_files/README.txt), with the reason each must give.
UNDECODABLE = {
    # four bytes of the J2K codestream replaced by a sequence delimiter
    "JPEG2000-embedded-sequence-delimiter.dcm": (
        r"transfer syntax 'JPEG 2000 Image Compression' \(1\.2\.840\.10008\.1\.2\.4\.91\): "
        r"every installed decoder \(.*pylibjpeg.*\) failed"
    ),
    # the file ends inside its pixel data
    "emri_small_jpeg_2k_lossless_too_short.dcm": r"no pixel data.*End of file reached",
    # a header without pixel data
    "UN_sequence.dcm": r"no pixel data",
}


@dataclass(frozen=True)
class Sample:
    """A compressed test file with the uncompressed files that hold its pixels."""

    path: Path
    syntax: UID
    shape: tuple[int, ...]  # what read_image returns: (rows, columns[, 3])
    same_instance: tuple[Path, ...]  # decompressed copies of this SOP instance
    originals: tuple[Path, ...]  # the one uncompressed original of its series (WG04 sets)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def lossless(self) -> bool:
        return "Lossless" in self.syntax.name and "Lossy" not in self.syntax.name


def _shipped_test_files() -> list[Path]:
    """pydicom's test files on this machine, its own and pydicom-data's. Not
    ``get_testdata_files``: that also tries to download the files pydicom knows of that
    pydicom-data 1.0.0 lacks (HTJ2K and more JPEG-LS ones), which fails offline after 15 s."""
    files = set((Path(DATA_ROOT) / "test_files").glob("**/*"))
    for source in external_data_sources().values():
        files.update(Path(path) for path in source.get_paths("**/*", DataTypes.DATASET))
    return sorted(file for file in files if file.is_file())


def _headers() -> Iterator[tuple[Path, pydicom.Dataset]]:
    for path in _shipped_test_files():
        try:
            dataset = pydicom.dcmread(path, defer_size=256)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        meta = getattr(dataset, "file_meta", None)
        if meta is not None and "TransferSyntaxUID" in meta:
            yield path, dataset


def _geometry(ds: pydicom.Dataset) -> tuple[object, ...]:
    return (ds.get("Rows"), ds.get("Columns"), ds.get("SamplesPerPixel"), ds.get("NumberOfFrames"))


def _complete_native(ds: pydicom.Dataset) -> bool:
    """Uncompressed pixel data at least as long as its geometry says (not truncated)."""
    if "PixelData" not in ds or ds.file_meta.TransferSyntaxUID.is_encapsulated:
        return False
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        size = ds.Rows * ds.Columns * ds.SamplesPerPixel * frames * ds.BitsAllocated // 8
    except (AttributeError, TypeError, ValueError):  # no or unusable image attributes
        return False
    item = ds.get_item("PixelData")
    length = item.length if isinstance(item, RawDataElement) else len(item.value)
    return int(length) >= size


def _catalogue() -> list[Sample]:
    """Every file pydicom ships with encapsulated (compressed) pixel data, and its references:
    complete uncompressed files of the same geometry holding the same SOP instance, or the one
    original (not marked lossy) of the same series."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few test files carry invalid UIDs on purpose
        return _pair(list(_headers()))


def _pair(headers: list[tuple[Path, pydicom.Dataset]]) -> list[Sample]:
    compressed, native = [], []
    for path, ds in headers:
        if ds.file_meta.TransferSyntaxUID.is_encapsulated:
            compressed.append((path, ds))
        elif _complete_native(ds):
            native.append((path, ds))
    samples = []
    for path, ds in compressed:
        same = [
            p
            for p, d in native
            if _geometry(d) == _geometry(ds) and d.SOPInstanceUID == ds.get("SOPInstanceUID")
        ]
        series = [
            (p, d)
            for p, d in native
            if _geometry(d) == _geometry(ds)
            and d.get("SeriesInstanceUID")
            and d.get("SeriesInstanceUID") == ds.get("SeriesInstanceUID")
            and str(d.get("LossyImageCompression", "")) != "01"
        ]
        unambiguous = len({d.SOPInstanceUID for _, d in series}) == 1
        colour = (
            ds.get("SamplesPerPixel") == 3 or ds.get("PhotometricInterpretation") == "PALETTE COLOR"
        )
        samples.append(
            Sample(
                path=path,
                syntax=UID(ds.file_meta.TransferSyntaxUID),
                shape=(ds.get("Rows"), ds.get("Columns"), *((3,) if colour else ())),
                same_instance=tuple(same),
                originals=tuple(p for p, _ in series) if unambiguous else (),
            )
        )
    return samples


SAMPLES = _catalogue()
DECODABLE = [s for s in SAMPLES if s.name not in UNDECODABLE]


def _testdata(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} missing: the Makefile installs pydicom-data"
    return Path(str(path))


class Site:
    """A site manifest listing every compressed test file and its references, read once."""

    def __init__(self, manifest: Path, files: list[Path]) -> None:
        with manifest.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "image"])
            writer.writerows([[f"row{i}", str(file)] for i, file in enumerate(files)])
        images = read_manifest(manifest).dataset.images
        assert images is not None and len(images) == len(files)
        self.manifest = manifest
        self.refs = dict(zip(files, images, strict=True))
        self._pixels: dict[Path, np.ndarray] = {}

    def load(self, path: Path) -> np.ndarray:
        """The file's pixels as the manifest path decodes them (ImageRef.load -> read_image)."""
        if path not in self._pixels:
            self._pixels[path] = self.refs[path].load()
        return self._pixels[path]


def _with_references(samples: list[Sample]) -> list[Path]:
    files = {s.path for s in samples}
    for sample in samples:
        files.update(sample.same_instance, sample.originals)
    return sorted(files)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    return Site(tmp_path_factory.mktemp("pacs") / "site.csv", _with_references(SAMPLES))


def test_catalogue_covers_the_syntaxes_and_pairs_references() -> None:
    assert {
        JPEGBaseline8Bit,
        JPEGExtended12Bit,
        JPEGLosslessSV1,
        JPEGLSLossless,
        JPEGLSNearLossless,
        JPEG2000Lossless,
        JPEG2000,
        RLELossless,
    } <= {s.syntax for s in DECODABLE}
    assert set(UNDECODABLE) <= {s.name for s in SAMPLES}, "a broken file is no longer shipped"
    paired = {s.name: {p.name for p in s.same_instance + s.originals} for s in SAMPLES}
    assert "MR2_UNCR.dcm" in paired["MR2_J2KR.dcm"]  # WG04: same series, other SOP instance
    assert "MR_small.dcm" in paired["MR_small_jpeg_ls_lossless.dcm"]
    assert "MR_truncated.dcm" not in paired["MR_small_RLE.dcm"]  # its pixel data is cut short
    assert "SC_rgb_jpeg_dcmd.dcm" in paired["SC_rgb_jpeg.dcm"]
    assert sum(1 for s in DECODABLE if s.lossless and paired[s.name]) >= 20


@pytest.mark.parametrize("sample", DECODABLE, ids=lambda s: s.name)
def test_compressed_file_decodes_through_the_manifest(site: Site, sample: Sample) -> None:
    image = site.load(sample.path)
    assert image.shape == sample.shape and image.dtype == np.float32
    assert float(image.min()) == 0.0 and float(image.max()) == 1.0
    if sample.lossless:
        for reference in {*sample.same_instance, *sample.originals}:
            np.testing.assert_array_equal(image, site.load(reference), err_msg=reference.name)
    elif sample.same_instance:
        for reference in sample.same_instance:
            error = np.abs(image - site.load(reference))
            assert float(error.max()) <= SAME_INSTANCE_ATOL, reference.name
    else:
        for reference in sample.originals:
            error = np.abs(image - site.load(reference))
            assert float(error.mean()) <= ORIGINAL_MEAN_ERROR, reference.name


def _stored_values(path: Path, plugin: str) -> np.ndarray | None:
    """The middle frame's stored values as ``plugin`` decodes them, None when it cannot."""
    dataset = pydicom.dcmread(path)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    decoder = get_decoder(dataset.file_meta.TransferSyntaxUID)
    try:
        values, _ = decoder.as_array(dataset, decoding_plugin=plugin, index=frames // 2, raw=True)
    except (RuntimeError, NotImplementedError, ValueError):
        return None
    return np.asarray(values, dtype=np.int64)


@pytest.mark.parametrize(
    "sample",
    [s for s in DECODABLE if not (s.same_instance or s.originals)],
    ids=lambda s: s.name,
)
def test_installed_decoders_agree_where_no_reference_ships(sample: Sample) -> None:
    """Without an uncompressed twin, every other installed decoder that reads the file is the
    reference: equal for lossless syntaxes, within 3 levels for lossy ones."""
    register_plugin()
    decoded = {
        plugin: values
        for plugin in get_decoder(sample.syntax).available_plugins
        if (values := _stored_values(sample.path, plugin)) is not None
    }
    assert decoded, f"no installed decoder reads {sample.name}"
    first, *others = decoded.values()
    for values in others:
        assert values.shape == first.shape
        assert int(np.abs(values - first).max()) <= (0 if sample.lossless else 3)


def test_imagecodecs_decodes_a_jpeg_with_a_nonstandard_scan_header() -> None:
    """JPEG-lossy.dcm (WG04 NM1_JPLY) has a sequential scan whose spectral selection is not
    0-63, which libjpeg refuses; JPGExtended.dcm is the same stream with the header fixed."""
    register_plugin()
    broken = _stored_values(_testdata("JPEG-lossy.dcm"), PLUGIN)
    fixed = _stored_values(_testdata("JPGExtended.dcm"), PLUGIN)
    assert broken is not None and fixed is not None and broken.max() > 255  # 12-bit samples
    np.testing.assert_array_equal(broken, fixed)


def _encoded(tmp_path: Path, syntax: UID, photometric: str, stream: bytes) -> Path:
    """SC_rgb_16bit.dcm with ``stream`` as its one compressed 12-bit frame."""
    dataset = pydicom.dcmread(_testdata("SC_rgb_16bit.dcm"))
    dataset.file_meta.TransferSyntaxUID = syntax
    dataset.BitsStored, dataset.HighBit = 12, 11
    dataset.PhotometricInterpretation = photometric
    dataset.PixelData = encapsulate([stream])
    dataset["PixelData"].VR = "OB"
    path = tmp_path / f"{syntax.keyword}.dcm"
    dataset.save_as(path)
    return path


@pytest.mark.parametrize(
    ("syntax", "photometric", "options", "atol"),
    [
        # pydicom converts only 8-bit YCbCr to RGB: the plugin has libjpeg-turbo convert 12-bit
        (JPEGExtended12Bit, "YBR_FULL", {"level": 95, "subsampling": "444"}, 8),
        (JPEGLosslessSV1, "RGB", {"lossless": True, "predictor": 1}, 0),
    ],
    ids=["extended-ybr", "lossless-rgb"],
)
def test_twelve_bit_colour_jpeg_decodes(
    tmp_path: Path, syntax: UID, photometric: str, options: dict[str, Any], atol: int
) -> None:
    """No 12-bit colour JPEG ships: encode one with imagecodecs' libjpeg-turbo and read it back
    through pydicom and read_image."""
    import imagecodecs

    rgb = pydicom.dcmread(_testdata("SC_rgb_16bit.dcm")).pixel_array >> 4
    stream = bytes(imagecodecs.jpeg8_encode(rgb, bitspersample=12, **options))
    path = _encoded(tmp_path, syntax, photometric, stream)
    register_plugin()
    decoded = pydicom.dcmread(path).pixel_array
    assert decoded.shape == rgb.shape and int(decoded.max()) > 255
    assert int(np.abs(decoded.astype(np.int64) - rgb).max()) <= atol
    image = read_image(path)
    assert image.shape == rgb.shape and float(image.max()) == 1.0


@pytest.mark.parametrize("name", ["MR_small.dcm", "emri_small.dcm"])
def test_htj2k_decodes_losslessly(tmp_path: Path, name: str) -> None:
    """No HTJ2K test file ships offline (pydicom-data 1.0.0 predates them): encode one with
    imagecodecs' OpenJPH and read it back through pydicom's HTJ2K decoder (pylibjpeg-openjpeg)."""
    import imagecodecs

    dataset = pydicom.dcmread(_testdata(name))
    frames = dataset.pixel_array.reshape(-1, dataset.Rows, dataset.Columns)
    dataset.file_meta.TransferSyntaxUID = HTJ2KLossless
    dataset.PixelData = encapsulate([bytes(imagecodecs.htj2k_encode(frame)) for frame in frames])
    dataset["PixelData"].VR = "OB"
    dataset.save_as(tmp_path / name)
    np.testing.assert_array_equal(read_image(tmp_path / name), read_image(_testdata(name)))


@pytest.mark.parametrize("name", sorted(UNDECODABLE))
def test_broken_file_is_a_one_line_error_naming_row_field_and_reason(site: Site, name: str) -> None:
    path = _testdata(name)
    with pytest.raises(DataError) as info:
        site.load(path)
    message = str(info.value)
    assert re.match(
        rf"{re.escape(str(site.manifest))} line \d+ \(id 'row\d+'\) field 'image': ", message
    )
    assert f"cannot decode DICOM {path}: " in message and "\n" not in message
    assert re.search(UNDECODABLE[name], message), message


def test_syntax_pydicom_cannot_decode_is_named(tmp_path: Path) -> None:
    dataset = pydicom.dcmread(_testdata("MR_small.dcm"))
    dataset.file_meta.TransferSyntaxUID = HEVCMP51
    dataset.PixelData = encapsulate([b"\x00\x00\x00\x01" + bytes(30)])
    dataset["PixelData"].VR = "OB"
    dataset.save_as(tmp_path / "video.dcm")
    with pytest.raises(DataError) as info:
        read_image(tmp_path / "video.dcm")
    assert (
        f"transfer syntax '{HEVCMP51.name}' ({HEVCMP51}): pydicom {pydicom.__version__} has no "
        "decoder for it" in str(info.value)
    )


def _site_packages_without(root: Path, prefixes: tuple[str, ...]) -> Path:
    """A view of this venv's site-packages (symlinks) lacking the named distributions."""
    installed = Path(pydicom.__file__).resolve().parents[1]
    view = root / "site-packages"
    view.mkdir()
    for entry in installed.iterdir():
        if not entry.name.lower().startswith(prefixes):
            (view / entry.name).symlink_to(entry)
    return view


def test_missing_decoder_names_the_syntax_and_the_packages(tmp_path: Path) -> None:
    """On a machine without imagecodecs (a fresh interpreter on a copy of the venv that lacks it
    and pylibjpeg-libjpeg) the errors name the transfer syntax and the permissively licensed
    packages to install, never the GPL pylibjpeg-libjpeg."""
    view = _site_packages_without(
        tmp_path, ("libjpeg", "_libjpeg", "pylibjpeg_libjpeg", "imagecodecs")
    )
    script = (
        "import sys\n"
        "from common.data.images import read_image\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        read_image(path)\n"
        "    except Exception as exc:\n"
        "        print(exc)\n"
    )
    files = [_testdata("MR_small_jpeg_ls_lossless.dcm"), _testdata("JPGExtended.dcm")]
    done = subprocess.run(
        [sys.executable, "-S", "-c", script, *map(str, files)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(view), str(REPO)])},
    )
    jpeg_ls, extended = done.stdout.splitlines()
    assert (
        f"cannot decode DICOM {files[0]}: transfer syntax 'JPEG-LS Lossless Image Compression' "
        "(1.2.840.10008.1.2.4.80): no decoder for it is installed (install one of: " in jpeg_ls
    )
    assert "imagecodecs" in jpeg_ls and "pyjpegls" in jpeg_ls
    assert f"transfer syntax '{JPEGExtended12Bit.name}' ({JPEGExtended12Bit}): " in extended
    assert "every installed decoder (pillow) failed" in extended and "12-bit" in extended
    assert "not installed: " in extended and "imagecodecs" in extended
    for message in (jpeg_ls, extended):
        assert "pylibjpeg-libjpeg" not in message, message  # GPL-3.0


def test_fedembed_embed_gives_lossless_files_their_uncompressed_embedding(
    tmp_path: Path,
    tiny_model_dirs: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    files = _with_references(DECODABLE)
    manifest = tmp_path / "site.csv"
    Site(manifest, files)
    encoder = str(tiny_model_dirs["image"])
    cache = tmp_path / "cache"
    argv = ["embed", "--data", str(manifest), "--image-encoder", encoder, "--text-encoder", "none"]
    assert main([*argv, "--cache-dir", str(cache)]) == 0
    assert f"{len(files)} examples embedded" in capsys.readouterr().out
    # pydicom's warnings and failed-plugin tracebacks (JPEG-lossy.dcm) stay at debug level
    assert not [r for r in caplog.records if r.name.startswith("pydicom")]
    spec = DataSpec(dataset=str(manifest), image_encoder=encoder, text_encoder="none")
    embedded, report, _ = embed_site(spec, cache_dir=cache)  # what the command stored
    assert report.stats["image"].misses == 0 and embedded.image is not None
    row = {file: embedded.image[i] for i, file in enumerate(files)}
    pairs = [
        (sample.path, reference)
        for sample in DECODABLE
        if sample.lossless
        for reference in {*sample.same_instance, *sample.originals}
    ]
    assert len(pairs) >= 20
    for compressed, reference in pairs:
        np.testing.assert_allclose(row[compressed], row[reference], atol=EMBEDDING_ATOL)
    # and the comparison tells pixels apart: a lossy file is off its uncompressed original
    lossy = next(s for s in DECODABLE if s.name == "SC_rgb_jpeg_lossy_gdcm.dcm")
    assert np.abs(row[lossy.path] - row[lossy.originals[0]]).max() > 10 * EMBEDDING_ATOL


def test_fedembed_embed_stops_at_an_undecodable_file_with_one_line(
    tmp_path: Path, tiny_model_dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    broken = _testdata("JPEG2000-embedded-sequence-delimiter.dcm")
    manifest = tmp_path / "site.csv"
    Site(manifest, [_testdata("MR_small_jpeg_ls_lossless.dcm"), broken])
    encoder = str(tiny_model_dirs["image"])
    argv = ["embed", "--data", str(manifest), "--image-encoder", encoder, "--text-encoder", "none"]
    assert main([*argv, "--cache-dir", str(tmp_path / "cache")]) == 2
    # the image is decoded as its batch is embedded: the cleared progress bar precedes the error
    err = capsys.readouterr().err.rsplit("\r", 1)[-1].strip()
    assert err.startswith(
        f"fedembed: error: {manifest} line 3 (id 'row1') field 'image': cannot decode DICOM "
        f"{broken}: transfer syntax 'JPEG 2000 Image Compression' (1.2.840.10008.1.2.4.91): "
    )
    assert len(err.splitlines()) == 1 and "Traceback" not in err
