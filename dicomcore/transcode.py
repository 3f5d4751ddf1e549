"""Changing the transfer syntax of a stored instance or of one frame, for WADO-RS.

Decoding goes through pydicom's pixel plugins: Pillow for 8-bit JPEG (baseline and extended; why in
dicomcore.decoding), pylibjpeg with pylibjpeg-libjpeg (12-bit and lossless JPEG), pylibjpeg-openjpeg
(JPEG 2000 and HTJ2K), pylibjpeg-rle and pyjpegls (JPEG-LS).
Between them they cover every compressed syntax an archive meets except MPEG/HEVC video, and they are also
what pydicom encodes with: RLE (pylibjpeg-rle), JPEG-LS (pyjpegls), JPEG 2000 (pylibjpeg-openjpeg).
python-gdcm would decode the same syntaxes but encodes only RLE. None of them encodes JPEG, so JPEG Baseline
goes through Pillow's libjpeg (8-bit only, quality 90, 4:2:2 chroma subsampling for colour, which is what
YBR_FULL_422 declares). Everything here is CPU-bound: callers run it in a worker thread.
"""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileDataset
from pydicom.encaps import encapsulate
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder, get_encoder
from pydicom.pixels.utils import pack_bits
from pydicom.uid import UID

from dicomcore.decoding import converts_ybr_itself, decode_as_reference, ybr_full_to_rgb
from dicomcore.frames import PixelDescription, regroup_fragments
from dicomcore.uids import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
)

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
JPEG_2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
JPEG_2000 = "1.2.840.10008.1.2.4.91"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
JPEG_QUALITY = 90

NATIVE_SYNTAXES = frozenset(
    {
        IMPLICIT_VR_LITTLE_ENDIAN,
        EXPLICIT_VR_LITTLE_ENDIAN,
        EXPLICIT_VR_BIG_ENDIAN,
        DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    }
)
# What this archive can produce. JPEG 2000 (.91) is produced losslessly, which that syntax allows.
NATIVE_TARGETS = frozenset({IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN})
ENCODED_TARGETS = frozenset({JPEG_BASELINE, JPEG_LS_LOSSLESS, JPEG_2000_LOSSLESS, JPEG_2000, RLE_LOSSLESS})
TARGETS = NATIVE_TARGETS | ENCODED_TARGETS
LOSSY_TARGETS = frozenset({JPEG_BASELINE})
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
# Transcoding an instance holds it (and its decoded pixels) in memory: larger stored objects are only
# delivered as stored, or frame by frame.
MAX_TRANSCODE_SIZE = 1 << 30


class TranscodeError(ValueError):
    """The requested transfer syntax cannot be produced for this instance or frame (HTTP 406)."""


class PixelDataError(ValueError):
    """The stored pixel data cannot be decoded: corrupt or not what its attributes say."""


def is_encapsulated(transfer_syntax: str) -> bool:
    return transfer_syntax not in NATIVE_SYNTAXES


def can_decode(transfer_syntax: str) -> bool:
    """True when an installed plugin decodes pixel data of this syntax (native syntaxes always)."""
    if not is_encapsulated(transfer_syntax):
        return True
    try:
        return bool(get_decoder(UID(transfer_syntax)).is_available)
    except NotImplementedError:
        return False


def check_transcode(stored: str, target: str, pixel: PixelDescription | None) -> None:
    """Raise TranscodeError (with the reason) unless `stored` pixel data can be delivered as `target`.

    `pixel` None means the instance has no pixel data: then only the dataset's encoding changes.
    """
    if target == stored:
        return
    if target not in TARGETS:
        raise TranscodeError(f"transcoding to {_name(target)} is not supported; supported: {_supported()}")
    if pixel is None:
        return
    if reason := syntax_refusal(stored, target):
        raise TranscodeError(reason)
    if target == JPEG_BASELINE and not (
        pixel.bits_allocated == 8 and pixel.pixel_representation == 0 and pixel.samples_per_pixel in (1, 3)
    ):
        raise TranscodeError(
            f"JPEG Baseline holds 8-bit unsigned pixels only; this image has {pixel.bits_allocated}-bit "
            f"{'signed' if pixel.pixel_representation else 'unsigned'} samples"
        )
    if target in LOSSY_TARGETS and pixel.photometric_interpretation == "PALETTE COLOR":
        raise TranscodeError(f"{_name(target)} is lossy and would corrupt PALETTE COLOR indices")
    if target in (JPEG_LS_LOSSLESS, JPEG_2000_LOSSLESS, JPEG_2000) and pixel.bits_allocated > 16:
        raise TranscodeError(f"{_name(target)} is not available for {pixel.bits_allocated}-bit pixel data")


def syntax_refusal(stored: str, target: str) -> str | None:
    """Why pixel data stored in `stored` cannot be delivered in `target`, as far as the syntaxes alone
    tell; None when it may be (the pixel data can still rule it out: check_transcode)."""
    if target == stored:
        return None
    if target not in TARGETS:
        return f"transcoding to {_name(target)} is not supported; supported: {_supported()}"
    if not can_decode(stored):
        return f"no installed decoder for the stored transfer syntax {_name(stored)}"
    return None


def _name(uid: str) -> str:
    name = UID(uid).name
    return f"{name} ({uid})" if name != uid else uid


def _supported() -> str:
    return ", ".join(sorted(TARGETS))


# ---------------------------------------------------------------------------------------------------------
# Whole instances


def transcode_instance(data: bytes, target: str) -> bytes:
    """The PS3.10 file `data` re-encoded in `target`; SOP Instance UID kept (the delivery is a
    representation of the stored instance, not a new one; lossy output says so in Lossy Image Compression).
    Raises TranscodeError or PixelDataError."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:  # stored objects were validated at ingest; still, never crash the request
        raise PixelDataError(f"stored object cannot be read: {exc}") from exc
    stored = str(ds.file_meta.TransferSyntaxUID)
    pixel = PixelDescription.from_json(_pixel_json(ds)) if _has_pixels(ds) else None
    check_transcode(stored, target, pixel)
    if stored == target:
        return data
    try:
        if is_encapsulated(stored):
            _decode_nested_pixel_data(ds, stored)  # first: decompress() changes the syntax items see
        if pixel is not None:
            if is_encapsulated(stored):
                if (regrouped := regroup_fragments(ds.PixelData, pixel.number_of_frames)) is not None:
                    ds.PixelData = regrouped
                own_ybr = converts_ybr_itself(
                    pixel.samples_per_pixel, pixel.bits_allocated, pixel.photometric_interpretation
                )
                decode_as_reference(
                    lambda plugin: ds.decompress(
                        as_rgb=not own_ybr, generate_instance_uid=False, decoding_plugin=plugin
                    ),
                    stored,
                    pixel.bits_stored,
                )
                if own_ybr:
                    _ybr_to_rgb_in_place(ds, pixel.bits_stored)
                decoded = int(ds.get("NumberOfFrames") or 1)
                if decoded != pixel.number_of_frames:
                    # pydicom takes the frames it finds in the fragments and rewrites NumberOfFrames
                    raise PixelDataError(
                        f"stored pixel data cannot be decoded: {decoded} of its "
                        f"{pixel.number_of_frames} frames found in its fragments"
                    )
            elif stored == EXPLICIT_VR_BIG_ENDIAN:
                _to_little_endian(ds)
                # the pixels are little endian now: pixel_array (JPEG Baseline, YBR expansion) must not
                # swap them again, as it does for 8-bit OW under the big endian syntax
                ds.file_meta.TransferSyntaxUID = UID(EXPLICIT_VR_LITTLE_ENDIAN)
            if target in ENCODED_TARGETS and ds.PhotometricInterpretation == "YBR_FULL_422":
                _expand_native_ybr_422(ds)
        if stored == EXPLICIT_VR_BIG_ENDIAN:
            # pydicom refuses to change a read dataset's endianness on write; a copy carries no such memory
            ds = FileDataset("", Dataset(ds), file_meta=ds.file_meta, preamble=ds.preamble)
    except (TranscodeError, PixelDataError):
        raise
    except Exception as exc:  # decoder plugins raise anything from ValueError to RuntimeError
        raise PixelDataError(f"stored pixel data cannot be decoded: {exc}") from exc
    if pixel is not None and target in ENCODED_TARGETS:
        try:
            if target == JPEG_BASELINE:
                _compress_jpeg_baseline(ds)
            else:
                encoder = _encoder_syntax(target, str(ds.PhotometricInterpretation))
                ds.compress(encoder, generate_instance_uid=False, **_encode_options(encoder))
        except TranscodeError:
            raise
        except Exception as exc:
            raise TranscodeError(f"cannot encode this image as {_name(target)}: {exc}") from exc
    ds.file_meta.TransferSyntaxUID = UID(target)
    # Every element parsed (VR looked up): a file whose data set is not encoded as its meta says (implicit VR
    # under an explicit syntax, as some writers produce) keeps raw elements without a VR otherwise, which
    # pydicom cannot write in an explicit syntax.
    for _ in ds.iterall():
        pass
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _ybr_to_rgb_in_place(ds: pydicom.Dataset, bits_stored: int) -> None:
    """Decompressed YBR_FULL samples of more than 8 bits (little endian, pixel-interleaved, as decompress
    writes them) converted to RGB; see dicomcore.decoding.converts_ybr_itself."""
    ybr = np.frombuffer(ds.PixelData, "<u2").reshape(-1, 3)
    ds.PixelData = ybr_full_to_rgb(ybr, bits_stored).astype("<u2").tobytes()
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0


def _decode_nested_pixel_data(ds: pydicom.Dataset, stored: str) -> None:
    """Decode the pixel data nested in sequence items (Icon Image Sequence; DCMTK compresses icons with
    the image), as dcmdjpeg and friends do: `decompress` handles only the top level, and encapsulated
    pixel data left in an item would be invalid in a native output and in the wrong codec in another
    compressed one. An item whose pixel data cannot be decoded takes its sequence with it (an icon is
    optional; the image is what was asked for)."""
    for elem in list(ds):
        if elem.VR != "SQ":
            continue
        for item in elem.value:
            pixel = item.get(0x7FE00010)  # the element (a keyword would give its value)
            if pixel is not None and pixel.is_undefined_length:
                try:
                    decoder = get_decoder(UID(stored))  # NotImplementedError: no decoder for the syntax
                    arr, meta = decode_as_reference(
                        lambda plugin, item=item, decoder=decoder: decoder.as_array(
                            item, as_rgb=True, decoding_plugin=plugin
                        ),
                        stored,
                    )
                except Exception:  # decoder plugins raise anything from ValueError to RuntimeError
                    del ds[elem.tag]
                    break
                item.PixelData = np.ascontiguousarray(arr).tobytes()
                item["PixelData"].VR = "OW" if arr.itemsize > 1 else "OB"
                item["PixelData"].is_undefined_length = False
                item.PhotometricInterpretation = meta["photometric_interpretation"]
                if int(item.get("SamplesPerPixel") or 1) > 1:
                    item.PlanarConfiguration = 0
            _decode_nested_pixel_data(item, stored)


def _has_pixels(ds: pydicom.Dataset) -> bool:
    return any(tag in ds for tag in _PIXEL_TAGS)


def _pixel_json(ds: pydicom.Dataset) -> dict:
    """The few Image Pixel attributes PixelDescription reads, as DICOM JSON."""
    keys = {
        "Rows": "00280010",
        "Columns": "00280011",
        "BitsAllocated": "00280100",
        "SamplesPerPixel": "00280002",
        "BitsStored": "00280101",
        "PixelRepresentation": "00280103",
        "PlanarConfiguration": "00280006",
        "NumberOfFrames": "00280008",
        "PhotometricInterpretation": "00280004",
    }
    out = {}
    for keyword, key in keys.items():
        value = ds.get(keyword)
        if value is not None and value != "":
            out[key] = {"Value": [value]}
    return out


def _encoder_syntax(target: str, photometric: str) -> str:
    """The syntax whose pydicom encoder makes `target`'s codestream. JPEG 2000 (.91) is written losslessly
    here, which its .90 encoder does too, and that one takes PALETTE COLOR (the .91 encoder refuses it,
    the syntax being lossy in general); the codestream is valid under either UID."""
    return JPEG_2000_LOSSLESS if target == JPEG_2000 and photometric == "PALETTE COLOR" else target


def _encode_options(target: str) -> dict:
    # pydicom's JPEG 2000 (.91) encoder is lossy unless told otherwise; a compression ratio of 1 is lossless
    return {"j2k_cr": [1]} if target == JPEG_2000 else {}


def _to_little_endian(ds: pydicom.Dataset) -> None:
    """Big endian native pixel data and other OW values as little endian bytes, for a little endian write."""
    arr = ds.pixel_array
    if ds.BitsAllocated == 1:
        ds.PixelData = pack_bits(arr)
    else:
        ds.PixelData = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
    for elem in ds.iterall():
        if elem.tag not in _PIXEL_TAGS and elem.VR in ("OW", "OF", "OL", "OD", "OV") and elem.value:
            width = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}[elem.VR]
            elem.value = np.frombuffer(elem.value, dtype=f">u{width}").astype(f"<u{width}").tobytes()


def _expand_native_ybr_422(ds: pydicom.Dataset) -> None:
    """Native YBR_FULL_422 holds chroma at half width, which no encoder takes: full-size RGB instead (what
    decompressing a JPEG YBR_FULL_422 image gives too)."""
    arr = ds.pixel_array  # pydicom upsamples the chroma and converts to RGB
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0


def _compress_jpeg_baseline(ds: pydicom.Dataset) -> None:
    frames = _frames_array(ds.pixel_array, int(ds.get("NumberOfFrames") or 1), int(ds.SamplesPerPixel))
    encoded = [_jpeg_baseline(frame) for frame in frames]
    ds.PixelData = encapsulate(encoded, has_bot=True)
    ds["PixelData"].VR = "OB"
    original = sum(frame.nbytes for frame in frames)
    if int(ds.SamplesPerPixel) == 3:
        ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PlanarConfiguration = 0 if int(ds.SamplesPerPixel) == 3 else ds.get("PlanarConfiguration")
    if ds.get("PlanarConfiguration") is None:
        del ds.PlanarConfiguration
    _mark_lossy(ds, original / max(sum(len(e) for e in encoded), 1))


def _values(ds: pydicom.Dataset, keyword: str) -> list:
    """An attribute's values as a list, whether it holds none, one or several."""
    value = ds.get(keyword)
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, MultiValue | list) else [value]


def _mark_lossy(ds: pydicom.Dataset, ratio: float) -> None:
    """PS3.3 C.7.6.1.1.5: lossy compression is recorded, earlier steps kept (ratio and method per step)."""
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = [*_values(ds, "LossyImageCompressionRatio"), f"{ratio:.2f}"[:16]]
    ds.LossyImageCompressionMethod = [
        *_values(ds, "LossyImageCompressionMethod"),
        "ISO_10918_1",
    ]


def _frames_array(arr: np.ndarray, frames: int, samples: int) -> list[np.ndarray]:
    single = arr.ndim == (3 if samples > 1 else 2)
    return [arr] if frames == 1 or single else list(arr)


def _jpeg_baseline(frame: np.ndarray) -> bytes:
    if frame.dtype != np.uint8:
        raise TranscodeError("JPEG Baseline holds 8-bit unsigned pixels only")
    image = Image.fromarray(frame, "RGB" if frame.ndim == 3 else "L")
    out = io.BytesIO()
    options = {"subsampling": 1} if frame.ndim == 3 else {}
    image.save(out, "JPEG", quality=JPEG_QUALITY, **options)
    return out.getvalue()


# ---------------------------------------------------------------------------------------------------------
# Single frames


def decode_frame(frame: bytes, stored: str, pixel: PixelDescription) -> tuple[np.ndarray, str]:
    """One frame's pixels (YBR converted to RGB) and the photometric interpretation they are in."""
    options = {
        "rows": pixel.rows,
        "columns": pixel.columns,
        "samples_per_pixel": pixel.samples_per_pixel,
        "bits_allocated": pixel.bits_allocated,
        "bits_stored": pixel.bits_stored,
        "pixel_representation": pixel.pixel_representation,
        "photometric_interpretation": pixel.photometric_interpretation,
        "planar_configuration": pixel.planar_configuration,
        "number_of_frames": 1,
        "pixel_keyword": "PixelData",
    }
    if stored == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        stored = EXPLICIT_VR_LITTLE_ENDIAN  # frames handed in are already inflated
    source = encapsulate([frame]) if is_encapsulated(stored) else frame
    own_ybr = converts_ybr_itself(
        pixel.samples_per_pixel, pixel.bits_allocated, pixel.photometric_interpretation
    )
    try:
        decoder = get_decoder(UID(stored))
        arr, meta = decode_as_reference(
            lambda plugin: decoder.as_array(source, as_rgb=not own_ybr, decoding_plugin=plugin, **options),
            stored,
            pixel.bits_stored,
        )
    except Exception as exc:
        raise PixelDataError(f"frame cannot be decoded as {_name(stored)}: {exc}") from exc
    if own_ybr:
        return ybr_full_to_rgb(arr, pixel.bits_stored), "RGB"
    return arr, str(meta.get("photometric_interpretation", pixel.photometric_interpretation))


def transcode_frame(frame: bytes, stored: str, pixel: PixelDescription, target: str) -> bytes:
    """The bytes of one frame (as stored in `stored`) delivered in `target`: native little endian bytes for
    the native syntaxes, else one compressed codestream. Raises TranscodeError or PixelDataError."""
    if target == stored or (target in NATIVE_TARGETS and stored in NATIVE_TARGETS):
        return frame
    check_transcode(stored, target, pixel)
    arr, photometric = decode_frame(frame, stored, pixel)
    if target in NATIVE_TARGETS:
        if pixel.bits_allocated == 1:
            return pack_bits(arr)
        return arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
    if target == JPEG_BASELINE:
        return _jpeg_baseline(arr)
    described = replace(
        pixel, photometric_interpretation=photometric, planar_configuration=0, number_of_frames=1
    )
    try:
        encoder = _encoder_syntax(target, described.photometric_interpretation)
        return get_encoder(UID(encoder)).encode(
            arr,
            rows=described.rows,
            columns=described.columns,
            samples_per_pixel=described.samples_per_pixel,
            bits_allocated=described.bits_allocated,
            bits_stored=described.bits_stored,
            pixel_representation=described.pixel_representation,
            photometric_interpretation=described.photometric_interpretation,
            planar_configuration=0,
            number_of_frames=1,
            **_encode_options(encoder),
        )
    except Exception as exc:
        raise TranscodeError(f"cannot encode this frame as {_name(target)}: {exc}") from exc
