"""Rendering pixel data as consumer images (PS3.18 8.3.5, rendered and thumbnail resources).

decode (pydicom + plugins, 8-bit JPEG with Pillow: see dicomcore.decoding) -> modality LUT -> VOI (window /
VOI LUT / Window Center-Width / min-max) -> 8-bit -> MONOCHROME1 inversion -> viewport (crop, flip, fit) ->
annotation -> Pillow encode.

Runs in a worker thread. The source is a seekable file-like object: pydicom's `iter_pixels` reads the header
and then only the bytes of the frames asked for, so a lazily fetching reader (see dicomcore.rangefile) keeps a
frame of a large multi-frame object from pulling the whole object.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, iter_pixels, pixel_array

from dicomcore.decoding import converts_ybr_itself, decode_as_reference, ybr_full_to_rgb
from dicomcore.dicomjson import raw_values
from dicomcore.frames import regroup_fragments
from dicomcore.framing import read_file, transfer_syntax_uid
from dicomcore.uids import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
)

MEDIA_TYPES = ("image/jpeg", "image/png", "image/gif")
WINDOW_FUNCTIONS = {"linear": "LINEAR", "linear-exact": "LINEAR_EXACT", "sigmoid": "SIGMOID"}
ANNOTATIONS = ("patient", "technique")
DEFAULT_QUALITY = 90
# An animated GIF of every frame is bounded: larger instances are better served as frames.
MAX_GIF_FRAMES = 500
RESCALE_INTERCEPT, RESCALE_SLOPE, PIXEL_DATA = 0x00281052, 0x00281053, 0x7FE00010
MODALITY_LUT_SEQUENCE, VOI_LUT_SEQUENCE = 0x00283000, 0x00283010


class RenderError(ValueError):
    """The instance cannot be rendered as asked; subclasses say why (the HTTP layer maps them)."""


class NoPixelDataError(RenderError):
    """The instance has no (Float/Double Float) Pixel Data."""


class FrameOutOfRangeError(RenderError):
    """A frame number outside 1..NumberOfFrames."""


class UndecodableError(RenderError):
    """The pixel data is corrupt or in a form no installed decoder handles."""


@dataclass(frozen=True, slots=True)
class Window:
    center: float
    width: float
    function: str = "LINEAR"  # the VOILUTFunction defined term


@dataclass(frozen=True, slots=True)
class Viewport:
    """vw,vh: the box the rendered region is fitted into; sx,sy,sw,sh: the source region (None: all)."""

    width: int
    height: int
    sx: int = 0
    sy: int = 0
    sw: int | None = None
    sh: int | None = None


@dataclass(frozen=True, slots=True)
class RenderOptions:
    media_type: str = "image/jpeg"
    window: Window | None = None
    viewport: Viewport | None = None
    quality: int = DEFAULT_QUALITY
    annotations: tuple[str, ...] = field(default_factory=tuple)


# ---------------------------------------------------------------------------------------- query parameters


def parse_window(text: str) -> Window:
    """`center,width[,function]` (PS3.18 8.3.5.1.4); the function defaults to linear. ValueError says why."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (2, 3):
        raise ValueError(f"window must be center,width,function; got {text!r}")
    try:
        center, width = float(parts[0]), float(parts[1])
    except ValueError:
        raise ValueError(f"window center and width must be numbers; got {text!r}") from None
    if not (math.isfinite(center) and math.isfinite(width)):
        raise ValueError(f"window center and width must be finite; got {text!r}")
    name = parts[2].lower() if len(parts) == 3 else "linear"
    function = WINDOW_FUNCTIONS.get(name)
    if function is None:
        raise ValueError(f"window function must be one of {', '.join(WINDOW_FUNCTIONS)}; got {parts[2]!r}")
    minimum = 1.0 if function == "LINEAR" else 0.0
    if width < minimum or (function != "LINEAR" and width == 0):
        raise ValueError(f"window width must be {'>= 1' if minimum else '> 0'} for {name}; got {width}")
    return Window(center, width, function)


def parse_viewport(text: str) -> Viewport:
    """`vw,vh[,sx,sy,sw,sh]` (PS3.18 8.3.5.1.3); sx..sh may each be empty (defaults)."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (2, 6):
        raise ValueError(f"viewport must be vw,vh or vw,vh,sx,sy,sw,sh; got {text!r}")
    try:
        values = [int(p) if p else None for p in parts]
    except ValueError:
        raise ValueError(f"viewport values must be integers; got {text!r}") from None
    vw, vh = values[0], values[1]
    if vw is None or vh is None or not (1 <= vw <= 8192 and 1 <= vh <= 8192):
        raise ValueError(f"viewport width and height must be 1..8192; got {text!r}")
    if len(values) == 2:
        return Viewport(vw, vh)
    sx, sy, sw, sh = values[2:]
    if (sx or 0) < 0 or (sy or 0) < 0:
        raise ValueError(f"viewport sx and sy must be >= 0; got {text!r}")
    if sw == 0 or sh == 0:
        raise ValueError(f"viewport sw and sh must not be 0; got {text!r}")
    return Viewport(vw, vh, sx or 0, sy or 0, sw, sh)


def parse_quality(text: str) -> int:
    try:
        quality = int(text)
    except ValueError:
        raise ValueError(f"quality must be an integer 1..100; got {text!r}") from None
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be 1..100; got {quality}")
    return quality


def parse_annotation(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(p.strip().lower() for p in text.split(",")))
    unknown = [n for n in names if n not in ANNOTATIONS]
    if unknown:
        raise ValueError(f"annotation must be a list of {', '.join(ANNOTATIONS)}; got {text!r}")
    return names


# ------------------------------------------------------------------------------------------------ decode


def _get(ds: Dataset, keyword: str) -> Any:
    """`ds.get(keyword)` for the attributes rendering reads: one value, a list of several, or None when
    absent or empty. A raw element of a number or code VR is decoded straight from its bytes
    (dicomcore.dicomjson.raw_values); converting a dozen of them through pydicom was a third of rendering
    a CT slice (docs/performance.md, "Rendered images")."""
    tag = tag_for_keyword(keyword)
    elem = ds._dict.get(tag)  # type: ignore[arg-type]
    if elem is None:
        return None
    if type(elem) is RawDataElement and (values := raw_values(elem)) is not None:
        return values[0] if len(values) == 1 else (values or None)
    value = ds[tag].value
    return None if value == "" else value


def read_header(fp: BinaryIO) -> Dataset:
    """Everything before the pixel data (and the file meta)."""
    fp.seek(0)
    try:
        return pydicom.dcmread(fp, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many kinds for damaged headers
        raise UndecodableError(f"cannot parse the stored object: {exc}") from exc


def frame_count(header: Dataset) -> int:
    try:
        return max(int(_get(header, "NumberOfFrames") or 1), 1)
    except (TypeError, ValueError):
        return 1


PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def load(fp: BinaryIO) -> tuple[Dataset, Dataset | None]:
    """(header, whole dataset or None). An object already in memory, or a deflated one (nothing to seek
    in), is parsed once, whole; otherwise only the header is, and frames are read later one by one."""
    whole = isinstance(fp, io.BytesIO)
    if not whole:
        header = read_header(fp)
        if transfer_syntax_uid(header) != DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
            return header, None
    fp.seek(0)
    try:
        ds = read_file(fp, None)  # pydicom's dcmread result, framed several times faster
    except Exception as exc:  # pydicom raises many kinds for damaged objects
        raise UndecodableError(f"cannot parse the stored object: {exc}") from exc
    return ds, ds


def decode_frames(
    fp: BinaryIO, header: Dataset, indices: Sequence[int], whole: Dataset | None = None
) -> list[np.ndarray]:
    """Pixel arrays of the 0-based frames, YBR converted to RGB, palette color still as indices."""
    total = frame_count(header)
    for i in indices:
        if not 0 <= i < total:
            raise FrameOutOfRangeError(f"frame {i + 1} is out of range: the instance has {total} frame(s)")
    if whole is not None and not any(k in whole for k in PIXEL_KEYWORDS):
        raise NoPixelDataError("the instance has no pixel data")

    if whole is not None and (native := _native_frames(whole, indices)) is not None:
        return native
    if whole is not None and "PixelData" in whole and whole["PixelData"].is_undefined_length:
        if (regrouped := regroup_fragments(whole.PixelData, total)) is not None:
            whole.PixelData = regrouped

    try:
        samples, allocated = (
            int(_get(header, "SamplesPerPixel") or 1),
            int(_get(header, "BitsAllocated") or 8),
        )
        own_ybr = converts_ybr_itself(
            samples, allocated, str(_get(header, "PhotometricInterpretation") or "")
        )
        stored_bits = int(_get(header, "BitsStored") or allocated)
    except (TypeError, ValueError):
        own_ybr, stored_bits = False, 0

    def decode(plugin: str) -> list[np.ndarray]:
        if whole is not None:
            arrays = [
                pixel_array(whole, index=i, decoding_plugin=plugin, as_rgb=not own_ybr) for i in indices
            ]
        else:
            fp.seek(0)
            arrays = list(iter_pixels(fp, indices=list(indices), decoding_plugin=plugin, as_rgb=not own_ybr))
        return [ybr_full_to_rgb(a, stored_bits) for a in arrays] if own_ybr else arrays

    try:
        return decode_as_reference(decode, transfer_syntax_uid(header), stored_bits)
    except RenderError:
        raise
    except AttributeError as exc:
        if "no pixel data" in str(exc).lower() or "Pixel Data" in str(exc):
            raise NoPixelDataError("the instance has no pixel data") from exc
        raise UndecodableError(f"cannot decode the pixel data: {exc}") from exc
    except Exception as exc:  # codecs raise RuntimeError, ValueError, ... for corrupt data
        raise UndecodableError(f"cannot decode the pixel data: {exc.__class__.__name__}: {exc}") from exc


_NATIVE_LITTLE_ENDIAN = frozenset(
    {IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN, DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN}
)


def _native_frames(ds: Dataset, indices: Sequence[int]) -> list[np.ndarray] | None:
    """The frames of native little-endian grayscale pixel data of 8 or 16 bits, straight from its bytes;
    None for anything else (pydicom decodes it). The same arrays as pydicom's pixel_array (the unused high
    bits shifted out, signed or not as Pixel Representation says), without its decoder set-up, which reads
    ~15 attributes for its options and was a fifth of rendering a CT slice (docs/performance.md)."""
    if transfer_syntax_uid(ds) not in _NATIVE_LITTLE_ENDIAN:
        return None
    raw = ds._dict.get(PIXEL_DATA)
    # pydicom's conversion of OB and OW values is the bytes themselves
    data = raw.value if type(raw) is RawDataElement and raw.VR in ("OB", "OW") else ds.get("PixelData")
    try:
        samples, rows, columns = (int(_get(ds, k)) for k in ("SamplesPerPixel", "Rows", "Columns"))
        allocated, stored = int(_get(ds, "BitsAllocated")), int(_get(ds, "BitsStored"))
        signed = int(_get(ds, "PixelRepresentation"))
    except (AttributeError, TypeError, ValueError):
        return None
    if (
        not isinstance(data, bytes)
        or samples != 1
        or allocated not in (8, 16)
        or not 1 <= stored <= allocated
        or signed not in (0, 1)
        or rows < 1
        or columns < 1
    ):
        return None
    dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
    pixels = rows * columns
    if len(data) < (max(indices, default=0) + 1) * pixels * dtype.itemsize:
        return None  # short pixel data: pydicom says what is wrong
    frames = []
    for index in indices:
        arr = np.frombuffer(data, dtype, pixels, index * pixels * dtype.itemsize).reshape(rows, columns)
        if stored < allocated:  # as pydicom's _correct_unused_bits: shifts, arithmetic when signed
            shift = allocated - stored
            arr = np.right_shift(np.left_shift(arr, shift), shift)
        frames.append(arr if arr.flags.writeable else arr.copy())  # pydicom's are writeable too
    return frames


# ----------------------------------------------------------------------------------------- to 8-bit image


def _first_number(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = value[0] if len(value) else None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def default_window(header: Dataset) -> Window | None:
    """The first Window Center/Width of the instance (or of its shared functional groups)."""
    source: Dataset = header
    if "WindowCenter" not in header:
        for seq in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
            items = header.get(seq)
            if items and "FrameVOILUTSequence" in items[0] and items[0].FrameVOILUTSequence:
                source = items[0].FrameVOILUTSequence[0]
                break
    center, width = _first_number(_get(source, "WindowCenter")), _first_number(_get(source, "WindowWidth"))
    if center is None or width is None or width <= 0:
        return None
    function = str(_get(source, "VOILUTFunction") or "LINEAR").upper()
    if function not in WINDOW_FUNCTIONS.values():
        function = "LINEAR"
    if function == "LINEAR" and width < 1:
        width = 1.0
    return Window(center, width, function)


def apply_window(values: np.ndarray, window: Window) -> np.ndarray:
    """PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT, SIGMOID) onto 0..255, as float."""
    c, w = window.center, window.width
    x = values.astype(np.float32, copy=False)
    if window.function == "SIGMOID":
        return 255.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    if window.function == "LINEAR_EXACT":
        return np.clip(((x - c) / w + 0.5) * 255.0, 0.0, 255.0)
    return np.clip(((x - (c - 0.5)) / (w - 1) + 0.5) * 255.0, 0.0, 255.0)


def apply_voi_sequence(values: np.ndarray, item: Dataset) -> np.ndarray:
    """A VOI LUT (PS3.3 C.11.2.1.1): first entry below the first mapped value, last above; onto 0..255."""
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 65536
    raw = item.LUTData
    if isinstance(raw, bytes):  # OW: 16-bit words (PS3.3 C.11.2.1.1 LUT Data), little endian as stored
        lut = np.frombuffer(raw, dtype="<u2").astype(float)[:entries]
    else:
        lut = np.asarray(raw if isinstance(raw, (list, tuple, pydicom.multival.MultiValue)) else [raw], float)
    top = float(2**bits - 1) if bits else float(lut.max() or 1)
    index = np.clip(np.rint(values).astype(np.int64) - first, 0, lut.size - 1)
    return lut[index] * (255.0 / top)


def _voi(values: np.ndarray, header: Dataset, window: Window | None) -> np.ndarray:
    """The requested window, else the instance's VOI LUT / window, else min-max; then MONOCHROME1."""
    voi = header.get("VOILUTSequence") if VOI_LUT_SEQUENCE in header._dict else None
    if window is None and voi and "LUTDescriptor" in voi[0]:
        out = apply_voi_sequence(values, voi[0])
    else:
        window = window or default_window(header)
        if window is None:
            low, high = float(np.min(values)), float(np.max(values))
            window = Window((low + high + 1) / 2, max(high - low + 1, 1.0), "LINEAR")
        out = apply_window(values, window)
    if str(_get(header, "PhotometricInterpretation") or "").upper() == "MONOCHROME1":
        out = 255.0 - out
    return out


def _rescaled(stored: np.ndarray, header: Dataset) -> np.ndarray:
    """pydicom's apply_modality_lut for a data set without a Modality LUT Sequence (Rescale Slope and
    Intercept, when both are there), with the two values read by `_get`; anything else is pydicom's."""
    if RESCALE_SLOPE not in header._dict or RESCALE_INTERCEPT not in header._dict:
        return stored
    slope, intercept = _get(header, "RescaleSlope"), _get(header, "RescaleIntercept")
    if not (isinstance(slope, float | int) and isinstance(intercept, float | int)):
        return apply_modality_lut(stored, header)  # empty or several values: pydicom's outcome
    arr = stored.astype(np.float64) * slope
    arr += intercept
    return arr


def to_grayscale8(arr: np.ndarray, header: Dataset, window: Window | None) -> np.ndarray:
    """Modality LUT then VOI. Integer pixels of up to 16 bits go through a table over their range (one
    entry per stored value), which costs one lookup per pixel instead of float arithmetic."""
    if arr.dtype.kind in "ui" and arr.dtype.itemsize <= 2 and MODALITY_LUT_SEQUENCE not in header._dict:
        low, high = int(arr.min()), int(arr.max())
        stored = np.arange(low, high + 1, dtype=np.int64)
        table = np.rint(_voi(_rescaled(stored, header), header, window)).astype(np.uint8)
        return table[np.subtract(arr, low, dtype=np.int32)]
    values = apply_modality_lut(arr, header) if arr.dtype.kind != "f" else arr
    return np.rint(_voi(values, header, window)).astype(np.uint8)


def to_rgb8(arr: np.ndarray, header: Dataset) -> np.ndarray:
    """RGB (YBR already converted by pydicom) or palette color, scaled to 8 bits per sample."""
    if str(_get(header, "PhotometricInterpretation") or "").upper() == "PALETTE COLOR":
        arr = apply_color_lut(arr, header)  # 8- or 16-bit entries, by the LUT descriptor
        bits = 8 if arr.dtype.itemsize == 1 else 16
    else:
        bits = int(_get(header, "BitsStored") or arr.dtype.itemsize * 8)
    if arr.dtype == np.uint8 and bits <= 8:
        return arr
    top = float(2**bits - 1)
    return np.rint(np.clip(arr.astype(np.float32) * (255.0 / top), 0, 255)).astype(np.uint8)


def to_image(arr: np.ndarray, header: Dataset, window: Window | None) -> Image.Image:
    samples = int(_get(header, "SamplesPerPixel") or 1)
    photometric = str(_get(header, "PhotometricInterpretation") or "").upper()
    if samples == 1 and photometric != "PALETTE COLOR":
        return Image.fromarray(to_grayscale8(arr, header, window), "L")
    return Image.fromarray(to_rgb8(arr, header), "RGB")


# ------------------------------------------------------------------------------- viewport and annotation


def apply_viewport(image: Image.Image, viewport: Viewport | None) -> Image.Image:
    """Crop to the source region (negative sw/sh: the region lies left of/above sx/sy and is flipped),
    then scale it to fit inside vw x vh keeping its aspect ratio."""
    if viewport is None:
        return image
    width, height = image.size
    sw = width - viewport.sx if viewport.sw is None else viewport.sw
    sh = height - viewport.sy if viewport.sh is None else viewport.sh
    x0, x1 = sorted((viewport.sx, viewport.sx + sw))
    y0, y1 = sorted((viewport.sy, viewport.sy + sh))
    x0, x1, y0, y1 = max(x0, 0), min(x1, width), max(y0, 0), min(y1, height)
    if x1 <= x0 or y1 <= y0:
        raise RenderError(f"the viewport's source region lies outside the {width}x{height} image")
    if (x0, y0, x1, y1) != (0, 0, width, height):
        image = image.crop((x0, y0, x1, y1))
    if sw < 0:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if sh < 0:
        image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    scale = min(viewport.width / image.width, viewport.height / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0 if scale < 0.5 else None)
    return image


def annotation_lines(header: Dataset, names: tuple[str, ...], frame: int, frames: int) -> list[str]:
    lines: list[str] = []
    if "patient" in names:
        lines.append(str(header.get("PatientName", "") or ""))
        ident = [str(header.get(k, "") or "") for k in ("PatientID", "PatientBirthDate", "PatientSex")]
        lines.append(" ".join(v for v in ident if v))
    if "technique" in names:
        parts = [str(header.get("Modality", "") or "")]
        window = default_window(header)
        if window is not None:
            parts.append(f"W {window.width:g} C {window.center:g}")
        if frames > 1:
            parts.append(f"frame {frame}/{frames}")
        lines.append(" ".join(p for p in parts if p))
    return [line for line in lines if line]


def draw_annotation(image: Image.Image, lines: list[str]) -> Image.Image:
    """Text in the top-left corner, white on a black outline so that it reads on any image."""
    if not lines:
        return image
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    white = 255 if image.mode == "L" else (255, 255, 255)
    black = 0 if image.mode == "L" else (0, 0, 0)
    draw.multiline_text((3, 3), "\n".join(lines), fill=white, font=font, stroke_width=1, stroke_fill=black)
    return image


# -------------------------------------------------------------------------------------------------- encode


def encode(images: list[Image.Image], options: RenderOptions, frame_time_ms: float | None = None) -> bytes:
    buffer = io.BytesIO()
    if options.media_type == "image/jpeg":
        images[0].save(buffer, "JPEG", quality=options.quality)
    elif options.media_type == "image/png":
        images[0].save(buffer, "PNG", compress_level=3)
    elif options.media_type == "image/gif":
        frames = [im if im.mode == "L" else im.convert("P", palette=Image.Palette.ADAPTIVE) for im in images]
        if len(frames) == 1:
            frames[0].save(buffer, "GIF")
        else:
            duration = max(int(frame_time_ms or 100), 20)
            frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=duration, loop=0)
    else:
        raise RenderError(f"cannot render as {options.media_type}")
    return buffer.getvalue()


def render(fp: BinaryIO, frames: Sequence[int] | None, options: RenderOptions) -> bytes:
    """One image of the given 1-based frames (an animated GIF when several), or for frames=None the
    whole instance: every frame as GIF, the first frame as JPEG or PNG."""
    header, whole = load(fp)
    total = frame_count(header)
    if frames is None:
        frames = range(1, min(total, MAX_GIF_FRAMES) + 1) if options.media_type == "image/gif" else [1]
    frames = list(frames)
    if len(frames) > 1 and options.media_type != "image/gif":
        raise RenderError(f"{options.media_type} holds one frame; ask for image/gif or one frame at a time")
    if len(frames) > MAX_GIF_FRAMES:
        raise RenderError(f"at most {MAX_GIF_FRAMES} frames are rendered into one GIF")
    arrays = decode_frames(fp, header, [f - 1 for f in frames], whole)
    images = []
    for number, arr in zip(frames, arrays, strict=True):
        image = apply_viewport(to_image(arr, header, options.window), options.viewport)
        if options.annotations:
            image = draw_annotation(image, annotation_lines(header, options.annotations, number, total))
        images.append(image)
    return encode(images, options, _first_number(_get(header, "FrameTime")))
