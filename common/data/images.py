"""Read PNG/JPEG (Pillow) and DICOM (pydicom) files into float32 arrays in [0, 1]."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import os
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import DataError

log = logging.getLogger(__name__)

DICOM_SUFFIXES = (".dcm", ".dicom")
_DICOM_MAGIC_OFFSET = 128
_HASH_CHUNK = 1 << 20
# pydicom's loggers: it logs each warning, and each failed decoder plugin with its traceback
# (also when a later plugin succeeds), which would break the CLI's one-line output.
_PYDICOM_LOGGERS = ("pydicom", "pydicom.pixels.decoders.base")
_held = threading.local()


def read_image(
    path: str | os.PathLike[str], *, context: str | None = None, expected_key: str | None = None
) -> np.ndarray:
    """Return the pixels of an image file as float32 in [0, 1], shape (H, W) or (H, W, 3).

    PNG/JPEG/other Pillow formats: 8-bit data is divided by 255 and 16-bit grayscale by 65535
    (absolute intensities are kept); palette, alpha, CMYK etc. are converted to RGB or gray and
    the EXIF orientation is applied. DICOM (suffix .dcm/.dicom or the "DICM" preamble): the
    modality LUT (rescale slope/intercept) and the VOI LUT or window (first one) are applied when
    present, MONOCHROME1 is inverted so that bright means dense, colour data becomes RGB, and the
    result is min-max scaled to [0, 1]. A multi-frame DICOM (a volume or cine) yields its middle
    frame (index ``frames // 2``). Compressed pixel data (JPEG, JPEG-LS, JPEG 2000, HTJ2K, RLE)
    goes through pydicom's decoder plugins (``common.data.dicom_codecs``); one that no installed
    decoder handles is an error naming its transfer syntax and the packages that would.

    The file is read once; with ``expected_key`` (its ``file_key`` when the manifest was read)
    those bytes must hash to it, so a file replaced or cut short since then is an error, never
    the embedding of other pixels under the old key. Raises DataError naming ``path`` (prefixed
    by ``context``, e.g. the manifest line and field) when the file is missing, unreadable,
    truncated, changed or not an image.
    """
    file = Path(path)
    if not file.is_file():
        reason = "is a directory, not an image file" if file.is_dir() else "image file not found"
        raise DataError(_message(context, f"{reason}: {file}"))
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise DataError(
            _message(context, f"cannot read image file {file}: {_first_line(exc)}")
        ) from exc
    if expected_key is not None and hashlib.sha256(data).hexdigest() != expected_key:
        raise DataError(
            _message(context, f"image file {file} changed since the manifest was read; reload it")
        )
    if file.suffix.lower() in DICOM_SUFFIXES or _has_dicom_preamble(data):
        return _read_dicom(file, data, context)
    return _read_pillow(file, data, context)


def _has_dicom_preamble(data: bytes) -> bool:
    return data[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + 4] == b"DICM"


def is_dicom(path: str | os.PathLike[str]) -> bool:
    """True for a .dcm/.dicom suffix or a file with the DICOM preamble ("DICM" at byte 128)."""
    file = Path(path)
    if file.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with file.open("rb") as handle:
            handle.seek(_DICOM_MAGIC_OFFSET)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def file_key(path: str | os.PathLike[str], *, context: str | None = None) -> str:
    """SHA-256 of a file's bytes: the ImageRef key of an image on disk."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise DataError(
            _message(context, f"cannot read image file {path}: {_first_line(exc)}")
        ) from exc
    return digest.hexdigest()


def _message(context: str | None, detail: str) -> str:
    return f"{context}: {detail}" if context else detail


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _read_pillow(file: Path, data: bytes, context: str | None) -> np.ndarray:
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            return _pillow_to_unit(ImageOps.exif_transpose(opened))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(
            _message(
                context, f"cannot decode image {file} (PNG/JPEG/DICOM expected): {_first_line(exc)}"
            )
        ) from exc


def _pillow_to_unit(image: Any) -> np.ndarray:
    mode = image.mode
    if mode == "1":
        return np.asarray(image, dtype=np.float32)
    if mode.startswith("I;16"):
        return np.asarray(image, dtype=np.float32) / 65535.0
    if mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float32)
        in_16bit = mode == "I" and values.min() >= 0 and values.max() <= 65535
        return values / 65535.0 if in_16bit else _min_max(values)
    if mode in ("L", "LA"):
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def _read_dicom(file: Path, data: bytes, context: str | None) -> np.ndarray:
    import pydicom

    from common.data.dicom_codecs import decode_failure, register_plugin

    def failed(reason: str) -> DataError:
        return DataError(_message(context, f"cannot decode DICOM {file}: {reason}"))

    register_plugin()
    # pydicom signals bad files and missing decoders with many exception types
    with warnings.catch_warnings(record=True) as caught, _pydicom_logs_held() as logged:
        warnings.simplefilter("always")
        try:
            dataset = pydicom.dcmread(io.BytesIO(data))
            frames = int(dataset.get("NumberOfFrames", 1) or 1)
        except Exception as exc:
            raise failed(_first_line(exc) + _warned(caught)) from exc
        try:  # a multi-frame image (volume, cine) yields its middle frame, the only one decoded
            dataset.pixel_array_options(index=frames // 2 if frames > 1 else None)
            frame = np.asarray(dataset.pixel_array)
        except Exception as exc:
            reason = decode_failure(dataset, exc) or _first_line(exc) + _warned(caught)
            raise failed(reason) from exc
        try:
            pixels = _dicom_to_unit(dataset, frame)
        except Exception as exc:
            raise failed(_first_line(exc)) from exc
    where = _message(context, str(file))
    for warning in caught:
        log.debug("%s: pydicom: %s", where, warning.message)
    for record in logged:
        log.debug("%s: pydicom: %s", where, record.getMessage())
    return pixels


def _warned(caught: list[warnings.WarningMessage]) -> str:
    """pydicom's first warning (e.g. the file ended inside its pixel data), as a suffix."""
    if not caught:
        return ""
    lines = str(caught[0].message).strip().splitlines()
    return f" (pydicom: {lines[0]})" if lines else ""


class _HoldFilter(logging.Filter):
    """Keeps back pydicom's records in a thread inside ``_pydicom_logs_held``."""

    def filter(self, record: logging.LogRecord) -> bool:
        held: list[logging.LogRecord] | None = getattr(_held, "records", None)
        if held is None:
            return True
        held.append(record)
        return False


@functools.cache
def _install_hold_filter() -> None:
    hold = _HoldFilter()
    for name in _PYDICOM_LOGGERS:
        logging.getLogger(name).addFilter(hold)


@contextlib.contextmanager
def _pydicom_logs_held() -> Iterator[list[logging.LogRecord]]:
    """pydicom's log records of this thread while inside, held back instead of emitted."""
    _install_hold_filter()
    records: list[logging.LogRecord] = []
    _held.records = records
    try:
        yield records
    finally:
        _held.records = None


def _dicom_to_unit(dataset: Any, array: np.ndarray) -> np.ndarray:
    """Modality LUT, then VOI LUT or window, on the full stored range (no 8-bit step), then
    min-max to [0, 1]; MONOCHROME1 is inverted, palette colour mapped to RGB."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        return _min_max(np.asarray(apply_color_lut(array, dataset)))
    if array.ndim == 3:
        return _min_max(array)
    values = apply_voi_lut(apply_modality_lut(array, dataset), dataset)
    scaled = _min_max(np.asarray(values))
    return 1.0 - scaled if photometric == "MONOCHROME1" else scaled


def _min_max(values: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] in float64 (32-bit samples keep their precision), returned as float32;
    a constant image becomes all zeros."""
    values = values.astype(np.float64, copy=False)
    low, high = float(np.min(values)), float(np.max(values))
    if not np.isfinite(low) or not np.isfinite(high):
        raise ValueError("image contains NaN or infinite values")
    if high <= low:
        return np.zeros(values.shape, dtype=np.float32)
    return ((values - low) / (high - low)).astype(np.float32)
