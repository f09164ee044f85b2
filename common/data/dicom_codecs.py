"""Compressed DICOM pixel data: a lenient JPEG fallback decoder and one-line decode failures.

pydicom decodes compressed pixel data through plugins; the project depends on pylibjpeg with its
libjpeg, openjpeg and rle plugins (JPEG, JPEG-LS, JPEG 2000, HTJ2K, RLE), next to pydicom's own
Pillow and RLE decoders. This module is one more pydicom decoder plugin: grayscale ISO 10918 JPEG
(baseline, extended 12-bit, lossless) through imagecodecs' libjpeg-turbo, tried after pydicom's
own plugins. libjpeg-turbo accepts streams that libjpeg rejects, such as a sequential scan
whose spectral selection is not 0-63 (NEMA WG04 NM1_JPLY, pydicom's JPEG-lossy.dcm).
"""

from __future__ import annotations

import functools
from typing import Any

from pydicom.uid import JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1

FALLBACK_PLUGIN = "imagecodecs"
# pydicom's plugin protocol: the syntaxes this module decodes and what each needs.
DECODER_DEPENDENCIES = {
    syntax: ("imagecodecs",)
    for syntax in (JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1)
}


def is_available(uid: str) -> bool:
    """pydicom's plugin protocol: whether this module can decode transfer syntax ``uid`` here."""
    if uid not in DECODER_DEPENDENCIES:
        return False
    try:
        import imagecodecs
    except ImportError:
        return False
    return hasattr(imagecodecs, "jpeg8_decode")  # a build may leave a codec out


def decode_frame(src: bytes, runner: Any) -> bytes:
    """pydicom's plugin protocol: one encoded frame -> its samples (grayscale JPEG only)."""
    if runner.samples_per_pixel != 1:
        raise NotImplementedError("the imagecodecs fallback decodes grayscale JPEG only")
    import imagecodecs

    return imagecodecs.jpeg8_decode(src).tobytes()


@functools.cache
def register_fallback() -> None:
    """Add the fallback to pydicom's JPEG decoders, after their own plugins (once per process)."""
    from pydicom.pixels import get_decoder

    for syntax in DECODER_DEPENDENCIES:
        try:
            get_decoder(syntax).add_plugin(FALLBACK_PLUGIN, (__name__, "decode_frame"))
        except ValueError:  # pydicom has a plugin of that name: use its own
            continue


def decode_failure(dataset: Any, exc: BaseException) -> str | None:
    """Why compressed pixel data did not decode, in one line naming the transfer syntax and the
    decoder packages (those that failed, or those to install); None for native pixel data.
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
    missing = "; ".join(decoder.missing_dependencies)
    if not decoder.available_plugins:
        return f"{named}: no decoder for it is installed (install one of: {missing})"
    lines = [line.strip().rstrip(":") for line in str(exc).splitlines() if line.strip()]
    detail = "; ".join(lines) or type(exc).__name__
    tried = ", ".join(decoder.available_plugins)
    others = f"; not installed: {missing}" if missing else ""
    return f"{named}: every installed decoder ({tried}) failed: {detail}{others}"
