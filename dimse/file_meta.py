"""The file meta information pynetdicom writes in front of each received object, laid out directly.

With chunked receive (dimse/server.py) pynetdicom writes a received C-STORE's data set to a temporary file
as its fragments arrive, behind a file meta group it builds as a pydicom FileMetaDataset and writes with
pydicom's `write_file_meta_info`: ~290 µs per object, on the DUL thread that reads the association, so
every C-STORE waits for it (the listener's, and a C-GET's or C-MOVE's sub-operations). That group is always
the same seven elements (PS3.10 7.1, explicit VR little endian), so `write` lays them out directly, with the
same bytes; a value pydicom should judge (a missing or non-ASCII UID from a peer) still goes through pydicom,
which refuses it as before.
"""

from __future__ import annotations

import re
import struct
from typing import Any, BinaryIO, NamedTuple

import pynetdicom.dimse_messages
from pydicom.filewriter import write_file_meta_info as pydicom_write_file_meta_info
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dsutils import create_file_meta as pynetdicom_create_file_meta

# a value pydicom writes unchanged: printable ASCII without spaces or value separators, at most 64 chars
_PLAIN = re.compile(r"[\x21-\x5B\x5D-\x7E]{1,64}")


class ReceivedMeta(NamedTuple):
    """What pynetdicom's create_file_meta is given for a received object."""

    sop_class_uid: str | None
    sop_instance_uid: str | None
    transfer_syntax: str | None


def create(*, sop_class_uid: Any, sop_instance_uid: Any, transfer_syntax: Any) -> ReceivedMeta:
    """pynetdicom's create_file_meta as its DIMSE messages call it (the three values of the request)."""
    values = (sop_class_uid, sop_instance_uid, transfer_syntax)
    return ReceivedMeta(*(None if v is None else str(v) for v in values))


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def _text(value: str, pad: bytes) -> bytes:
    data = value.encode("ascii")
    return data + pad if len(data) % 2 else data


def encode(meta: ReceivedMeta) -> bytes | None:
    """The file meta group of a received object, or None for values pydicom should write."""
    if not (meta.sop_class_uid and meta.sop_instance_uid and meta.transfer_syntax):
        return None  # pydicom refuses a group without them
    values = (*meta, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION)
    if not all(_PLAIN.fullmatch(str(v)) for v in values):
        return None  # pydicom strips spaces and NULs, refuses what is then empty, and warns
    group = b"".join(
        (
            _element(0x00020001, b"OB", b"\x00\x01"),
            _element(0x00020002, b"UI", _text(meta.sop_class_uid, b"\x00")),
            _element(0x00020003, b"UI", _text(meta.sop_instance_uid, b"\x00")),
            _element(0x00020010, b"UI", _text(meta.transfer_syntax, b"\x00")),
            _element(0x00020012, b"UI", _text(str(PYNETDICOM_IMPLEMENTATION_UID), b"\x00")),
            _element(0x00020013, b"SH", _text(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
        )
    )
    return _element(0x00020000, b"UL", struct.pack("<I", len(group))) + group


def write(fp: BinaryIO, file_meta: Any, enforce_standard: bool = True) -> None:
    """pydicom's write_file_meta_info as pynetdicom's DIMSE messages call it."""
    if isinstance(file_meta, ReceivedMeta):
        if (data := encode(file_meta)) is not None:
            fp.write(data)
            return
        file_meta = pynetdicom_create_file_meta(
            sop_class_uid=file_meta.sop_class_uid,  # type: ignore[arg-type]
            sop_instance_uid=file_meta.sop_instance_uid,  # type: ignore[arg-type]
            transfer_syntax=file_meta.transfer_syntax,  # type: ignore[arg-type]
        )
    pydicom_write_file_meta_info(fp, file_meta, enforce_standard)


def install() -> None:
    """Write received objects' file meta with `write` (idempotent; pynetdicom.dimse_messages only)."""
    pynetdicom.dimse_messages.create_file_meta = create  # type: ignore[attr-defined]
    pynetdicom.dimse_messages.write_file_meta_info = write  # type: ignore[attr-defined]
