"""Which of pydicom's decoder plugins decodes stored pixel data, so that what WADO-RS returns (transcoded,
frames, rendered) is what reference toolkits decode.

For JPEG Baseline and Extended pydicom tries gdcm, then pylibjpeg, then Pillow. With pylibjpeg installed (the
archive needs it for JPEG Lossless, JPEG 2000 and RLE) that is pylibjpeg-libjpeg, a JPEG implementation of
its own whose chroma upsampling differs from that of the IJG libjpeg family DCMTK, GDCM, fo-dicom and Pillow
(libjpeg-turbo) share: on a YBR_FULL_422 image with sharp colour edges its RGB lies up to ~25 levels from
theirs. Pillow decodes 8-bit JPEG as DCMTK's dcmdjpeg does (equal pixels on pydicom's bundled JPEG files),
while the colour conversion stays pydicom's: the result is exactly pydicom's own decode with Pillow as its
JPEG plugin, which is pydicom's default wherever pylibjpeg is not installed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import cache
from typing import TypeVar

import numpy as np
from pydicom.pixels import get_decoder
from pydicom.uid import UID, JPEGBaseline8Bit, JPEGExtended12Bit

T = TypeVar("T")

REFERENCE_JPEG_PLUGIN = "pillow"
_IJG_DECODED = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit})


@cache
def reference_plugin(transfer_syntax: str) -> str:
    """The plugin to decode `transfer_syntax` with; "" (pydicom's own order) unless it is 8-bit JPEG."""
    if transfer_syntax not in _IJG_DECODED:
        return ""
    available = get_decoder(UID(transfer_syntax)).available_plugins
    return REFERENCE_JPEG_PLUGIN if REFERENCE_JPEG_PLUGIN in available else ""


def decode_as_reference(
    decode: Callable[[str], T], transfer_syntax: str, bits_stored: int | None = None
) -> T:
    """`decode(plugin)` with the reference plugin for the syntax. Pillow refuses 12-bit JPEG Extended (and
    may refuse a stream another decoder takes): then pydicom's own order decides, and raises its own error.
    Samples of more than 8 bits (`bits_stored`, when the caller knows it) go to pydicom's order at once,
    rather than through a refusal that pydicom logs as a warning on every decode."""
    plugin = reference_plugin(transfer_syntax) if (bits_stored or 0) <= 8 else ""
    if not plugin:
        return decode("")
    try:
        return decode(plugin)
    except Exception:  # plugins raise anything from ValueError to RuntimeError
        return decode("")


_YBR_FULL = frozenset({"YBR_FULL", "YBR_FULL_422"})


def converts_ybr_itself(samples_per_pixel: int, bits_allocated: int, photometric: str) -> bool:
    """True when YBR_FULL(_422) samples of more than 8 bits are decoded: pydicom converts YBR to RGB for
    8-bit samples only (its convert_color_space refuses others), so the caller decodes them with
    as_rgb=False and converts with ybr_full_to_rgb. Such images are 12-bit colour JPEG (Extended), as
    DCMTK's dcmcjpeg +ee writes for colour images of more than 8 bits (and for 8-bit ones with +bt)."""
    return samples_per_pixel == 3 and bits_allocated > 8 and photometric.upper() in _YBR_FULL


def ybr_full_to_rgb(arr: np.ndarray, bits_stored: int) -> np.ndarray:
    """YBR_FULL samples (last axis) of `bits_stored` bits as RGB of the same dtype: PS3.3 C.7.6.3.1.2
    (ITU T.871) with the chroma centred at 2**(bits_stored - 1), as pydicom does for 8 bits and IJG
    libjpeg for 12 (within rounding of DCMTK's dcmdjpeg)."""
    top = (1 << bits_stored) - 1
    centre = float(1 << (bits_stored - 1))
    ybr = arr.astype(np.float64)
    y, cb, cr = ybr[..., 0], ybr[..., 1] - centre, ybr[..., 2] - centre
    rgb = np.stack((y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb), axis=-1)
    return np.clip(np.rint(rgb), 0, top).astype(arr.dtype)


# pydicom's loggers that report each codec plugin's failure with LOGGER.exception, and OpenJPEG's, whose
# messages (e.g. "Number of resolutions is too high" for a JPEG 2000 of an image under 32 pixels a side)
# come at ERROR before pydicom raises the refusal the client gets
_CODEC_LOGGERS = (
    "pydicom.pixels.decoders.base",
    "pydicom.pixels.encoders.base",
    "openjpeg.encode",
)


class _WithoutTraceback(logging.Filter):
    """Drops the traceback of a codec plugin's failure and logs it as a warning.

    pydicom logs each plugin that fails with its traceback, then raises one error naming every plugin's
    reason, which the archive answers with (406 or 422 and that reason). For a file no installed codec takes
    (a 12-bit JPEG, a corrupt stream) every request put screens of tracebacks in the log that say nothing
    more than the one-line reasons kept here; so did every plugin that gave way to the next (Pillow refusing
    a 12-bit JPEG Extended frame that pylibjpeg then decodes, on every transcode or C-GET of it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info or record.levelno > logging.WARNING:
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
        return True


def quiet_codec_tracebacks() -> None:
    """Install _WithoutTraceback on pydicom's codec loggers (idempotent; each server process calls it)."""
    for name in _CODEC_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _WithoutTraceback) for f in logger.filters):
            logger.addFilter(_WithoutTraceback())


quiet_codec_tracebacks()  # every process that decodes through this module, servers or not
