"""Where each frame of an instance's pixel data lies in the stored object, so a frame is a ranged read.

The table is computed once at ingest (dicomcore/parse.py) and kept in the instance's bulk data index; at
request time a native frame, or an encapsulated frame of one fragment, is a single ranged read of the stored
object. Encapsulated frame boundaries come from walking the fragment items, never from trusting the Basic
Offset Table alone: it may be empty (allowed) or wrong (seen in the wild), and a frame may span fragments.
"""

from __future__ import annotations

import io
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from dicomcore.dicomjson import first_value
from dicomcore.uids import EXPLICIT_VR_BIG_ENDIAN

# (offset, length) in the stored object of one piece of a frame: the whole native frame, or one fragment's
# bytes (without its item header). A frame is the concatenation of its pieces.
Extent = tuple[int, int]
FrameTable = list[list[Extent]]

PIXEL_DATA = "7FE00010"
# Float and Double Float Pixel Data are native only, framed like Pixel Data.
PIXEL_DATA_PATHS = ("7FE00010", "7FE00008", "7FE00009")
# bulk_index rows "7FE00010#3" hold the pieces of frame 3 (see dicomcore/parse.py for the format)
FRAME_PATH_SEPARATOR = "#"

# item and sequence delimiter tags (FFFE,E000) and (FFFE,E0DD) as a little endian (group, element) pair read
# as one 32-bit number, followed by the 32-bit length
_HEADER = struct.Struct("<II")
_ITEM_TAG = 0xE000FFFE
_SEQUENCE_DELIMITER_TAG = 0xE0DDFFFE
_FRAME_LIST_RE = re.compile(r"[0-9]+(,[0-9]+)*")
# first bytes of a frame's codestream: JPEG / JPEG-LS SOI, JPEG 2000 SOC+SIZ, JP2 signature box
_FRAME_STARTS = (b"\xff\xd8\xff", b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0cjP  ")


def _starts_frame(head: bytes) -> bool:
    """Whether a fragment's first bytes are a frame's first: a codestream's first marker, or an RLE header
    (PS3.5 G.5: 1 to 15 segments, the first at offset 64), which is how DCMTK finds RLE frames whose
    fragments were split (dcmcrle +fs)."""
    if head.startswith(_FRAME_STARTS):
        return True
    if len(head) < 8:
        return False
    segments, first = struct.unpack("<II", head[:8])
    return 1 <= segments <= 15 and first == 64


class FrameListError(ValueError):
    """A malformed frame list in a URL (400)."""


@dataclass(frozen=True, slots=True)
class PixelDescription:
    """The Image Pixel module attributes needed to cut, decode and encode frames (from DICOM JSON)."""

    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    photometric_interpretation: str
    planar_configuration: int
    number_of_frames: int

    @classmethod
    def from_json(cls, attrs: dict) -> PixelDescription | None:
        """None when the attributes needed to interpret pixel data are missing or nonsensical."""
        try:
            rows = int(first_value(attrs, "00280010"))
            columns = int(first_value(attrs, "00280011"))
            bits_allocated = int(first_value(attrs, "00280100"))
            samples = int(first_value(attrs, "00280002") or 1)
            bits_stored = int(first_value(attrs, "00280101") or bits_allocated)
            representation = int(first_value(attrs, "00280103") or 0)
            planar = int(first_value(attrs, "00280006") or 0)
            frames = int(first_value(attrs, "00280008") or 1)
        except (TypeError, ValueError):
            return None
        if min(rows, columns, bits_allocated, samples, frames) < 1:
            return None
        photometric = str(first_value(attrs, "00280004") or ("RGB" if samples == 3 else "MONOCHROME2"))
        return cls(
            rows, columns, samples, bits_allocated, bits_stored, representation, photometric, planar, frames
        )

    @property
    def frame_bits(self) -> int:
        """Bits of one native frame. Native YBR_FULL_422 keeps chroma at half width: two luma samples per
        chroma pair, so 2 samples per pixel rather than 3 (PS3.3 C.7.6.3.1.2)."""
        samples = self.samples_per_pixel
        if samples == 3 and self.photometric_interpretation == "YBR_FULL_422":
            samples = 2
        return self.rows * self.columns * samples * self.bits_allocated

    @property
    def native_frame_length(self) -> int | None:
        """Bytes per native frame; None when frames are not byte-aligned (1-bit data of odd size)."""
        return self.frame_bits // 8 if self.frame_bits % 8 == 0 else None


def native_frame_table(pixel: PixelDescription, value_offset: int, value_length: int) -> FrameTable | None:
    """Frames of native pixel data: consecutive, equal-sized; None if they do not fit the value."""
    size = pixel.native_frame_length
    if size is None or size * pixel.number_of_frames > value_length:
        return None
    return [[(value_offset + i * size, size)] for i in range(pixel.number_of_frames)]


def fragments(fp: BinaryIO, value_offset: int) -> tuple[list[int], list[Extent], list[bytes]]:
    """Walk the items of an encapsulated value that starts at `value_offset` of `fp`, reading only item
    headers and each fragment's first bytes: (Basic Offset Table entries, fragment extents (offset of the
    fragment bytes in fp, length), fragment heads). Raises ValueError when the items are malformed."""
    fp.seek(0, io.SEEK_END)
    end = fp.tell()
    pos = value_offset
    offsets: list[int] | None = None
    pieces: list[Extent] = []
    heads: list[bytes] = []
    header = _HEADER.unpack
    while pos < end:  # a value read whole ends at its last item, a stored one at the sequence delimiter
        fp.seek(pos)
        chunk = fp.read(16)  # the item header and the first bytes of its value, in one read
        if len(chunk) < 8:
            raise ValueError("encapsulated pixel data ends without a sequence delimiter")
        tag, length = header(chunk[:8])
        if tag == _SEQUENCE_DELIMITER_TAG:
            break
        if tag != _ITEM_TAG:
            raise ValueError(f"expected an item tag at byte {pos} of the encapsulated pixel data")
        if length == 0xFFFFFFFF or pos + 8 + length > end:
            raise ValueError(f"item at byte {pos} of the encapsulated pixel data overruns the object")
        if offsets is None:
            if length % 4:
                raise ValueError("Basic Offset Table length is not a multiple of 4")
            fp.seek(pos + 8)
            offsets = list(struct.unpack(f"<{length // 4}I", fp.read(length)))
        else:
            pieces.append((pos + 8, length))
            heads.append(chunk[8 : 8 + min(length, 8)])
        pos += 8 + length
    if offsets is None:
        raise ValueError("encapsulated pixel data has no Basic Offset Table item")
    return offsets, pieces, heads


def encapsulated_frame_table(fp: BinaryIO, value_offset: int, number_of_frames: int) -> FrameTable | None:
    """Group the fragments of an encapsulated value into frames; None when the grouping is ambiguous.

    In order: one frame takes all fragments; as many fragments as frames means one each; a Basic Offset
    Table is used only when every entry points at a fragment item; otherwise a fragment that starts with a
    codestream's first marker (SOI, SOC, JP2 signature) or an RLE header starts a frame, if that yields the
    frame count.
    Raises ValueError for malformed items.
    """
    offsets, pieces, heads = fragments(fp, value_offset)
    if not pieces:
        return None
    if number_of_frames == 1:
        return [pieces]
    if len(pieces) == number_of_frames:
        return [[p] for p in pieces]
    if len(pieces) < number_of_frames:
        return None
    # item starts relative to the first fragment's item, as the Basic Offset Table counts them
    base = pieces[0][0] - 8
    starts = [offset - 8 - base for offset, _ in pieces]
    if len(offsets) == number_of_frames and offsets[0] == 0 and offsets == sorted(set(offsets)):
        index = {start: i for i, start in enumerate(starts)}
        if all(o in index for o in offsets):
            return _group(pieces, [index[o] for o in offsets])
    begins = [i for i, head in enumerate(heads) if _starts_frame(head)]
    if len(begins) == number_of_frames and begins[0] == 0:
        return _group(pieces, begins)
    return None


def regroup_fragments(value: bytes, number_of_frames: int) -> bytes | None:
    """An encapsulated value whose frames span several fragments, re-encapsulated with one fragment per
    frame (as pydicom's decoders need when the Basic Offset Table is empty: they find the frames of RLE by
    counting fragments); None when it needs no change or its fragments cannot be grouped."""
    from pydicom.encaps import encapsulate  # local: pydicom is needed only here

    try:
        table = encapsulated_frame_table(io.BytesIO(value), 0, number_of_frames)
    except ValueError:
        return None
    if table is None or len(table) != number_of_frames or all(len(frame) == 1 for frame in table):
        return None
    return encapsulate([b"".join(value[o : o + n] for o, n in frame) for frame in table])


def _group(pieces: list[Extent], begins: list[int]) -> FrameTable:
    bounds = [*begins, len(pieces)]
    return [pieces[bounds[i] : bounds[i + 1]] for i in range(len(begins))]


def frame_rows(path: str, table: FrameTable, vr: str) -> list[tuple[str, int, int, str]]:
    """bulk_index rows for a frame table: one ("7FE00010#n", offset, length, vr) per piece, in order."""
    return [
        (f"{path}{FRAME_PATH_SEPARATOR}{n}", offset, length, vr)
        for n, frame in enumerate(table, start=1)
        for offset, length in frame
    ]


def frames_from_index(entries: Iterable[Sequence], path: str = PIXEL_DATA) -> FrameTable | None:
    """The frame table stored in bulk_index rows, None for instances indexed before it existed."""
    prefix = path + FRAME_PATH_SEPARATOR
    table: dict[int, list[Extent]] = {}
    for entry in entries:
        name = entry[0]
        if name.startswith(prefix):
            table.setdefault(int(name[len(prefix) :]), []).append((entry[1], entry[2]))
    if not table:
        return None
    return [table[n] for n in range(1, len(table) + 1)]


def parse_frame_list(text: str) -> list[int]:
    """The 1-based frame numbers of a WADO-RS frame list ("1,3,5"), in the order asked; duplicates kept."""
    text = text.replace(" ", "")
    if not _FRAME_LIST_RE.fullmatch(text):
        raise FrameListError(
            f"malformed frame list {text!r}: expected comma-separated frame numbers, e.g. 1,2,3"
        )
    numbers = [int(n) for n in text.split(",")]
    if any(n < 1 for n in numbers):
        raise FrameListError(f"frame numbers start at 1, got {text!r}")
    return numbers


def cut_frames(data: bytes, path: str, pixel: PixelDescription, numbers: Sequence[int]) -> list[bytes]:
    """Frames cut from a whole stored object by parsing it: the fallback for objects without a frame table
    (deflated, indexed before the table existed, or fragments that could not be grouped at ingest). Native
    frames come back in the stored byte order (but 8-bit samples in order, whatever their VR); deflated ones
    inflated. Raises ValueError when corrupt."""
    import pydicom  # local: only this fallback needs a full parse
    from pydicom.encaps import generate_frames
    from pydicom.pixels.utils import pack_bits, unpack_bits

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        elem = ds[int(path, 16)]
        value = elem.value
        if (
            ds.file_meta.TransferSyntaxUID == EXPLICIT_VR_BIG_ENDIAN
            and elem.VR == "OW"
            and pixel.bits_allocated == 8
        ):
            # 8-bit samples swapped in 16-bit words, as big endian OW is: back in sample order
            swapped = bytearray(value[: len(value) // 2 * 2])
            swapped[0::2], swapped[1::2] = swapped[1::2], swapped[0::2]
            value = bytes(swapped)
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            value = regroup_fragments(value, pixel.number_of_frames) or value
            frames = list(generate_frames(value, number_of_frames=pixel.number_of_frames))
            return [frames[n - 1] for n in numbers]
    except Exception as exc:  # pydicom raises many types for corrupt data
        raise ValueError(f"pixel data cannot be split into frames: {exc}") from exc
    size = pixel.native_frame_length
    if size is not None:
        if size * pixel.number_of_frames > len(value):
            raise ValueError(
                f"pixel data holds {len(value)} bytes, {pixel.number_of_frames} frames need more"
            )
        return [bytes(value[(n - 1) * size : n * size]) for n in numbers]
    bits = unpack_bits(value)  # 1-bit frames that do not start on a byte boundary
    per_frame = pixel.rows * pixel.columns * pixel.samples_per_pixel
    return [pack_bits(bits[(n - 1) * per_frame : n * per_frame]) for n in numbers]
