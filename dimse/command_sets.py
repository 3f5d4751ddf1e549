"""DIMSE command sets encoded without pydicom's writer.

pynetdicom encodes every message's command set with pydicom twice (once to measure the group length, once
to send it): ~80 µs each for half a dozen elements, paid per C-STORE response, per C-FIND match and per
C-GET sub-operation. A command set is always implicit VR little endian (PS3.7 6.3.1) and its elements are
few and simple (PS3.7 Annex E: US and UL numbers, UI, AE and a few other text values), so `encode` lays
them out directly; anything else (an unusual VR, a non-ASCII text, a value that does not fit) goes to
pynetdicom's encoder, which `install` leaves in place for every other use.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import pynetdicom.dimse_messages
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom.dsutils import encode as pynetdicom_encode

_NUMBERS = {"US": "<H", "UL": "<I", "SS": "<h", "SL": "<i"}
_TEXT_PADDING = {"UI": b"\x00", "AE": b" ", "CS": b" ", "SH": b" ", "LO": b" ", "ST": b" ", "LT": b" "}


def _value_bytes(vr: str, value: object) -> bytes | None:
    values = list(value) if isinstance(value, list | tuple | MultiValue) else [value]
    if value is None or value == "" or values == []:
        return b""
    if vr in _NUMBERS:
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return None
        try:
            return b"".join(struct.pack(_NUMBERS[vr], v) for v in values)
        except struct.error:  # out of range: pydicom's writer says so
            return None
    if not all(isinstance(v, str) and v.isascii() for v in values):
        return None
    data = "\\".join(str(v) for v in values).encode("ascii")
    return data + _TEXT_PADDING[vr] if len(data) % 2 else data


def encode(ds: Dataset) -> bytes | None:
    """`ds` in implicit VR little endian, or None when it holds something only pydicom should encode."""
    elements = []
    for tag, element in sorted(ds._dict.items()):
        if type(element) is not DataElement:
            return None
        elements.append((tag, element.VR, element.value))
    return encode_elements(elements)


def encode_elements(elements: Iterable[tuple[int, str, object]]) -> bytes | None:
    """(tag, VR, value) elements, in ascending tag order, in implicit VR little endian; None when one holds
    something only pydicom should encode."""
    parts = []
    for tag, vr, value in elements:
        if vr not in _NUMBERS and vr not in _TEXT_PADDING:
            return None
        data = _value_bytes(vr, value)
        if data is None:
            return None
        parts += (struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(data)), data)
    return b"".join(parts)


def _encode(
    ds: Dataset, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False
) -> bytes | None:
    """pynetdicom's encoder as its DIMSE messages see it (they encode only command sets with it)."""
    if is_implicit_vr and is_little_endian and not deflated and (data := encode(ds)) is not None:
        return data
    return pynetdicom_encode(ds, is_implicit_vr, is_little_endian, deflated)


def install() -> None:
    """Encode pynetdicom's command sets with `encode` (idempotent)."""
    pynetdicom.dimse_messages.encode = _encode  # type: ignore[attr-defined]
