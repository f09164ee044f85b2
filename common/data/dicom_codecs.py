"""Compressed DICOM pixel data: an imagecodecs decoder plugin for pydicom and one-line failures.

pydicom decodes compressed pixel data through plugins. The project's are all permissively
licensed: pydicom's own Pillow and RLE decoders, pylibjpeg with its openjpeg (JPEG 2000, HTJ2K)
and rle plugins, and this module, which decodes every ISO 10918 JPEG (baseline, extended 12-bit,
lossless) with imagecodecs' libjpeg-turbo and JPEG-LS with its CharLS. It is tried after
pydicom's own plugins. libjpeg-turbo also accepts a sequential scan whose spectral selection is
not 0-63 (NEMA WG04 NM1_JPLY, pydicom's JPEG-lossy.dcm). pylibjpeg-libjpeg, pydicom's other
JPEG and JPEG-LS decoder, is GPL-3.0: errors never suggest installing it.
"""

from __future__ import annotations

import functools
from typing import Any

from pydicom.uid import (
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

PLUGIN = "imagecodecs"
JPEG_SYNTAXES = (JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1)
JPEG_LS_SYNTAXES = (JPEGLSLossless, JPEGLSNearLossless)
# pydicom's plugin protocol: the syntaxes this module decodes and what each needs.
DECODER_DEPENDENCIES = {
    syntax: ("imagecodecs>=2024.1",) for syntax in (*JPEG_SYNTAXES, *JPEG_LS_SYNTAXES)
}
_YBR = ("YBR_FULL", "YBR_FULL_422")
# Decoder distributions that are copyleft (GPL): a decode error never suggests them.
COPYLEFT_DECODERS = ("pylibjpeg-libjpeg",)


def is_available(uid: str) -> bool:
    """pydicom's plugin protocol: whether this module can decode transfer syntax ``uid`` here."""
    if uid not in DECODER_DEPENDENCIES:
        return False
    try:
        import imagecodecs
    except ImportError:
        return False
    codec = imagecodecs.JPEGLS if uid in JPEG_LS_SYNTAXES else imagecodecs.JPEG8
    return bool(codec.available)  # a build may leave a codec out


def decode_frame(src: bytes, runner: Any) -> bytes:
    """pydicom's plugin protocol: one encoded frame -> its samples colour-by-pixel, in
    containers of the stream's precision, in the stored colour space (pydicom converts it)
    except 12- and 16-bit YCbCr, which pydicom cannot convert: that becomes RGB here."""
    import imagecodecs
    import numpy as np

    spaces = imagecodecs.JPEG8.CS
    if runner.transfer_syntax in JPEG_LS_SYNTAXES:
        frame = imagecodecs.jpegls_decode(src)
    elif runner.samples_per_pixel == 1:
        frame = imagecodecs.jpeg8_decode(src)
    elif runner.bits_stored > 8 and runner.photometric_interpretation in _YBR:
        frame = imagecodecs.jpeg8_decode(src, colorspace=spaces.YCbCr, outcolorspace=spaces.RGB)
        runner.set_option("photometric_interpretation", "RGB")
    else:  # the same colour space in and out: libjpeg-turbo leaves the components as they are
        frame = imagecodecs.jpeg8_decode(src, colorspace=spaces.YCbCr, outcolorspace=spaces.YCbCr)
    if runner.samples_per_pixel > 1:
        runner.set_option("planar_configuration", 0)
    runner.set_option("bits_allocated", 8 * frame.dtype.itemsize)
    return np.ascontiguousarray(frame).tobytes()


@functools.cache
def register_plugin() -> None:
    """Add this module to pydicom's JPEG and JPEG-LS decoders, after their own plugins (once
    per process)."""
    from pydicom.pixels import get_decoder

    for syntax in DECODER_DEPENDENCIES:
        try:
            get_decoder(syntax).add_plugin(PLUGIN, (__name__, "decode_frame"))
        except ValueError:  # pydicom has a plugin of that name: use its own
            continue


def decode_failure(dataset: Any, exc: BaseException) -> str | None:
    """Why compressed pixel data did not decode, in one line naming the transfer syntax and the
    decoder packages (those that failed, or permissive ones to install); None for native pixel
    data.
    """
    from pydicom import __version__ as pydicom_version
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    meta = getattr(dataset, "file_meta", None)
    value = meta.get("TransferSyntaxUID") if meta is not None else None
    if value is None or "PixelData" not in dataset:
        return None
    syntax = UID(str(value))
    if not syntax.is_encapsulated:
        return None
    named = f"transfer syntax '{syntax.name}' ({syntax})"
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        return (
            f"{named}: pydicom {pydicom_version} has no decoder for it; export these images "
            "uncompressed or as JPEG, JPEG-LS, JPEG 2000 or RLE"
        )
    missing = "; ".join(
        plugin
        for plugin in decoder.missing_dependencies
        if not any(package in plugin for package in COPYLEFT_DECODERS)
    )
    if not decoder.available_plugins:
        return f"{named}: no decoder for it is installed (install one of: {missing})"
    lines = [line.strip().rstrip(":") for line in str(exc).splitlines() if line.strip()]
    detail = "; ".join(lines) or type(exc).__name__
    tried = ", ".join(decoder.available_plugins)
    others = f"; not installed: {missing}" if missing else ""
    return f"{named}: every installed decoder ({tried}) failed: {detail}{others}"
