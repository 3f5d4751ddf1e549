"""Reading one stored or uploaded DICOM object: validate it and describe it for the index.

Runs in a worker thread (CPU-bound); reads headers and small values only, leaving bulk data (pixel data,
large binary values) unread so that memory stays bounded for any object size. Elements are framed by
dicomcore.framing (pydicom's dcmread result, built several times faster).
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.tag import BaseTag

from dicomcore.dicomjson import ALWAYS_BULK_TAGS, UNDEFINED_LENGTH, BulkRef, encode_dataset
from dicomcore.directjson import encode_file
from dicomcore.frames import (
    PIXEL_DATA_PATHS,
    PixelDescription,
    encapsulated_frame_table,
    frame_rows,
    native_frame_table,
)
from dicomcore.framing import TruncatedError, read_file, transfer_syntax_uid
from dicomcore.uids import DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN, is_valid_uid

# Values larger than this are not read at parse time (pydicom's defer_size).
DEFER_SIZE = 1024
# In-memory uploads are encoded by dicomcore.directjson, which gives what the Dataset path (framing +
# dicomjson) gives, without building the Dataset; anything unusual still takes that path.
DIRECT = True


# The study, series and class UIDs of a series' instances repeat: a lookup instead of a match (~1 µs each).
_valid_uid = functools.lru_cache(maxsize=4096)(is_valid_uid)


class InvalidInstanceError(ValueError):
    """The object is not a DICOM instance this archive can accept; the message says why."""


class NonConformantInstanceError(InvalidInstanceError):
    """The object parses, but lacks a required attribute or holds an invalid UID: it does not match its SOP
    class (DIMSE's 0xA900, where an unparseable object is 0xC000).

    Its SOP Class and Instance UIDs, where those are present and valid, so that a refusal can name the
    instance it refuses (STOW-RS's Failed SOP Sequence item)."""

    def __init__(
        self, message: str, *, sop_class_uid: str | None = None, sop_instance_uid: str | None = None
    ) -> None:
        super().__init__(message)
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = sop_instance_uid


# The bulk data index (ParsedInstance.bulk, stored as instance.bulk_index: orjson [[path, offset, length,
# vr], ...]) holds one row per bulk value, addressed by the relative BulkDataURI path ("7FE00010",
# "00540016/0/00181072"; offset None when the bytes are not addressable in the stored object: nested or
# deflated). Since the WADO-RS frames work it also holds the frame table, migration-free, as extra rows
# whose path is the pixel data path, "#" and the 1-based frame number: ["7FE00010#3", offset, length, vr]
# is one piece of frame 3 - the whole native frame, or the bytes of one fragment (item header excluded),
# several rows in order when a frame spans fragments. "#" never occurs in a BulkDataURI path, so readers
# that look values up by path are unaffected; rows indexed before have no "#" rows and readers fall back to
# cutting frames from the object (dicomcore/frames.py frames_from_index returns None).


@dataclass(slots=True)
class ParsedInstance:
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    attrs: dict  # DICOM JSON of the dataset (bulk data as relative BulkDataURIs)
    bulk: list[BulkRef] = field(default_factory=list)


REQUIRED_UIDS = (
    ("StudyInstanceUID", "0020000D"),
    ("SeriesInstanceUID", "0020000E"),
    ("SOPInstanceUID", "00080018"),
    ("SOPClassUID", "00080016"),
)


def parse_instance(fp: BinaryIO | bytes) -> ParsedInstance:
    """Parse a PS3.10 file, check the identifying UIDs, and build its DICOM JSON.

    Raises InvalidInstanceError for anything that is not a well-formed PS3.10 instance with valid UIDs.
    """
    if DIRECT and type(fp) is bytes:
        direct = encode_file(fp, DEFER_SIZE)
        if direct is not None:
            _check_transfer_syntax(direct.transfer_syntax)
            return _describe(direct.transfer_syntax, direct.attrs, direct.bulk, direct.pixel, fp)
    if isinstance(fp, (bytes, bytearray, memoryview)):
        fp = io.BytesIO(fp)
    try:
        ds = read_file(fp, DEFER_SIZE)
    except TruncatedError as exc:
        raise InvalidInstanceError(str(exc)) from exc
    except InvalidDicomError as exc:
        raise InvalidInstanceError(f"not a DICOM PS3.10 file: {exc}") from exc
    except (EOFError, OSError, ValueError, KeyError, TypeError, struct.error, zlib.error) as exc:
        # zlib.error: a deflated data set whose bytes do not inflate
        raise InvalidInstanceError(f"cannot parse DICOM: {exc.__class__.__name__}: {exc}") from exc
    transfer_syntax = transfer_syntax_uid(ds)
    _check_transfer_syntax(transfer_syntax)
    bulk: list[BulkRef] = []
    try:
        attrs = encode_dataset(ds, bulk)
        # Truncated files fail only when the reader reaches the missing bytes; make sure it did.
        if transfer_syntax != DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
            _check_complete(ds, fp)
    except InvalidInstanceError:
        raise
    except Exception as exc:  # pydicom raises a wide variety of errors for corrupt element data
        raise InvalidInstanceError(f"cannot parse DICOM: {exc.__class__.__name__}: {exc}") from exc
    pixel = {}
    if transfer_syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        # offsets refer to the inflated stream, not the stored bytes
        bulk = [BulkRef(b.path, None, b.length, b.vr) for b in bulk]
    else:
        for tag in ALWAYS_BULK_TAGS:
            raw = ds._dict.get(BaseTag(tag))
            if raw is not None:
                pixel[tag] = (getattr(raw, "length", None), getattr(raw, "value", None))
    return _describe(transfer_syntax, attrs, bulk, pixel, fp)


def _check_transfer_syntax(transfer_syntax: str) -> None:
    if not transfer_syntax:
        raise InvalidInstanceError("file meta information lacks TransferSyntaxUID (0002,0010)")
    if not is_valid_uid(transfer_syntax):
        raise InvalidInstanceError(f"invalid TransferSyntaxUID {transfer_syntax!r}")


def _describe(
    transfer_syntax: str,
    attrs: dict,
    bulk: list[BulkRef],
    pixel: dict[int, tuple[int | None, bytes | None]],
    fp: BinaryIO | bytes,
) -> ParsedInstance:
    """The ParsedInstance of an encoded object: frame table added, identifying UIDs checked.

    pixel: the top-level pixel data elements' (length, value) as read (framing's RawDataElement fields);
    empty for deflated objects, whose offsets are not the stored bytes'."""
    if pixel:
        bulk.extend(_frame_refs(pixel, attrs, bulk, fp, transfer_syntax))
    uids: dict[str, str] = {}  # the valid ones
    problems: list[str] = []
    for name, key in REQUIRED_UIDS:
        entry = attrs.get(key) or {}
        values = entry.get("Value") or []
        value = values[0].strip("\x00 ") if values and values[0] else None
        if not value:
            problems.append(f"required attribute {name} ({key[:4]},{key[4:]}) is missing or empty")
        elif not _valid_uid(value):
            problems.append(f"{name} {value!r} is not a valid UID")
        else:
            uids[name] = value
    if problems:
        raise NonConformantInstanceError(
            problems[0], sop_class_uid=uids.get("SOPClassUID"), sop_instance_uid=uids.get("SOPInstanceUID")
        )
    return ParsedInstance(
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
        transfer_syntax_uid=transfer_syntax,
        attrs=attrs,
        bulk=bulk,
    )


def _check_complete(ds: pydicom.Dataset, fp: BinaryIO) -> None:
    """Every deferred value must lie inside the file: a truncated upload must not be stored as valid."""
    fp.seek(0, io.SEEK_END)
    end = fp.tell()
    for raw in ds._dict.values():
        tell = getattr(raw, "value_tell", None)
        length = getattr(raw, "length", None)
        if tell is None or length is None or length == 0xFFFFFFFF:
            continue
        if tell + length > end:
            raise InvalidInstanceError(
                f"file is truncated: ({raw.tag.group:04X},{raw.tag.element:04X}) needs {length} bytes "
                f"at offset {tell}, file ends at {end}"
            )


def _frame_refs(
    pixel: dict[int, tuple[int | None, bytes | None]],
    attrs: dict,
    bulk: list[BulkRef],
    fp: BinaryIO | bytes,
    transfer_syntax: str,
) -> list[BulkRef]:
    """The frame table of the top-level pixel data as extra bulk index rows (format above); [] when
    there is no pixel data or its frames cannot be located unambiguously (they are served by parsing then).
    Never raises: a frame table is an optimisation, not a reason to refuse an instance."""
    ref = next((b for b in bulk if b.path in PIXEL_DATA_PATHS and b.offset is not None), None)
    description = PixelDescription.from_json(attrs)
    if ref is None or ref.offset is None or description is None:
        return []
    if transfer_syntax == EXPLICIT_VR_BIG_ENDIAN and ref.vr == "OW" and description.bits_allocated == 8:
        # 8-bit samples in big endian OW are swapped in 16-bit words: no byte range of the stored value is
        # a frame (cut_frames swaps the value back first)
        return []
    try:
        length, value = pixel.get(int(ref.path, 16), (None, None))
        if length != UNDEFINED_LENGTH and ref.length != UNDEFINED_LENGTH:
            table = native_frame_table(description, ref.offset, ref.length)
        elif isinstance(value, bytes):
            # the encapsulated value was read whole: walk it in memory, then shift to file offsets
            table = encapsulated_frame_table(io.BytesIO(value), 0, description.number_of_frames)
            if table is not None:
                table = [[(offset + ref.offset, length) for offset, length in frame] for frame in table]
        else:
            if isinstance(fp, bytes):
                fp = io.BytesIO(fp)
            table = encapsulated_frame_table(fp, ref.offset, description.number_of_frames)
    except Exception:  # malformed items, I/O on a spooled body: no table, frames get cut by parsing
        return []
    if table is None:
        return []
    return [BulkRef(*row) for row in frame_rows(ref.path, table, ref.vr)]
