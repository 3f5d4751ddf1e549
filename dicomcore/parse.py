"""Reading one stored or uploaded DICOM object: validate it and describe it for the index.

Runs in a worker thread (pydicom is CPU-bound); reads headers and small values only, leaving bulk data
(pixel data, large binary values) unread so that memory stays bounded for any object size.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field
from typing import BinaryIO

import pydicom
from pydicom.errors import InvalidDicomError

from dicomcore.dicomjson import BulkRef, encode_dataset
from dicomcore.uids import DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, is_valid_uid

# Values larger than this are not read at parse time (pydicom's defer_size).
DEFER_SIZE = 1024


class InvalidInstanceError(ValueError):
    """The object is not a DICOM instance this archive can accept; the message says why."""


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
    if isinstance(fp, (bytes, bytearray, memoryview)):
        fp = io.BytesIO(fp)
    try:
        ds = pydicom.dcmread(fp, defer_size=DEFER_SIZE)
    except InvalidDicomError as exc:
        raise InvalidInstanceError(f"not a DICOM PS3.10 file: {exc}") from exc
    except (EOFError, OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise InvalidInstanceError(f"cannot parse DICOM: {exc.__class__.__name__}: {exc}") from exc
    meta = getattr(ds, "file_meta", None)
    transfer_syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if not transfer_syntax:
        raise InvalidInstanceError("file meta information lacks TransferSyntaxUID (0002,0010)")
    if not is_valid_uid(transfer_syntax):
        raise InvalidInstanceError(f"invalid TransferSyntaxUID {transfer_syntax!r}")
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
    if transfer_syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        # offsets refer to the inflated stream, not the stored bytes
        bulk = [BulkRef(b.path, None, b.length, b.vr) for b in bulk]
    uids = {}
    for name, key in REQUIRED_UIDS:
        entry = attrs.get(key) or {}
        values = entry.get("Value") or []
        value = values[0] if values else None
        if not value:
            raise InvalidInstanceError(f"required attribute {name} ({key[:4]},{key[4:]}) is missing or empty")
        value = value.strip("\x00 ")
        if not is_valid_uid(value):
            raise InvalidInstanceError(f"{name} {value!r} is not a valid UID")
        uids[name] = value
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
