"""C-FIND response identifiers built already encoded.

A study-level match is a dozen text attributes; building it with `Dataset.from_json` and letting pydicom
encode it cost ~0.6 ms, which a C-FIND pays per match. Here each value is encoded once, as PS3.5 lays out
text values (backslash-separated values, PN component groups joined by "=", even length padded with a space,
or NUL for UI), and the whole identifier is laid out in the response's little-endian encoding. The result
is still a Dataset (of raw elements, for anything that looks at it), and pynetdicom's encoder sends its
bytes as they are (`install`). Anything else (sequences, binary or decimal values, a character set asked for
as a key, a big-endian context) is left to the pydicom path: the caller builds a Dataset as before.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from typing import Any

import pynetdicom.service_class
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pynetdicom.dsutils import encode as pynetdicom_encode

SPECIFIC_CHARACTER_SET = 0x00080005
# text VRs whose JSON values are strings (PN: objects of component groups)
_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
)
RAW_VRS = _TEXT_VRS | {"IS"}  # the VRs whose values text_values gives (IS from JSON integers)
_LONG_VRS = frozenset(
    {"UC", "UR", "UT"}
)  # of RAW_VRS, those with a 32-bit length in explicit VR (PS3.5 7.1.2)
_UTF8 = ["UTF8"]  # pydicom's name for ISO_IR 192
_DEFAULT = "iso8859"  # pydicom's default character set, as a dataset without (0008,0005) reports it


class EncodedIdentifier(Dataset):
    """A Dataset of raw elements that also holds its encoding: `encoded`, in `implicit` VR little endian."""

    encoded: bytes
    implicit: bool


_FRESH_STATE = Dataset().__dict__  # what Dataset.__init__ sets, copied into each identifier


def _new_identifier() -> EncodedIdentifier:
    """An empty EncodedIdentifier, made without Dataset.__init__, whose attributes each go through
    Dataset.__setattr__ (a keyword lookup per name): that and adding the elements one by one through
    Dataset.__setitem__ were half of `build`'s time, paid per C-FIND match."""
    ds = EncodedIdentifier.__new__(EncodedIdentifier)
    ds.__dict__.update({k: v.copy() if isinstance(v, dict | list) else v for k, v in _FRESH_STATE.items()})
    return ds


def text_values(vr: str, element: Mapping[str, Any] | None) -> list[str] | None:
    """The values of a DICOM JSON element of a text VR (or IS) as strings; None when not representable."""
    if element is None:
        return []
    if "InlineBinary" in element or "BulkDataURI" in element:
        return None
    out: list[str] = []
    for value in element.get("Value") or ():
        if value is None:
            out.append("")
        elif vr == "PN":
            if not isinstance(value, dict):
                return None
            groups = [
                value.get("Alphabetic") or "",
                value.get("Ideographic") or "",
                value.get("Phonetic") or "",
            ]
            if any("=" in group for group in groups):
                return None  # a group holding the group delimiter: pydicom decides what it means
            while groups and not groups[-1]:
                groups.pop()
            out.append("=".join(groups))
        elif vr == "IS":
            if isinstance(value, bool) or not isinstance(value, int):
                return None
            out.append(str(value))
        elif vr in _TEXT_VRS and isinstance(value, str):
            out.append(value)
        else:
            return None
    return out


def build(elements: Iterable[tuple[int, str, list[str]]], *, implicit: bool) -> EncodedIdentifier | None:
    """The identifier of (tag, VR, string values) elements, with (0008,0005) ISO_IR 192 when a value is not
    ASCII; None when a value is too long for its VR's length field (pydicom's path then reports it)."""
    elements = list(elements)
    utf8 = not all(v.isascii() for _, _, values in elements for v in values)
    if utf8:
        elements.append((SPECIFIC_CHARACTER_SET, "CS", ["ISO_IR 192"]))
    codec = "utf-8" if utf8 else "ascii"
    ds = _new_identifier()
    held = ds._dict  # public text elements go straight in; Dataset.__setitem__ adds nothing for them
    parts = []
    for tag, vr, values in sorted(elements):
        value = "\\".join(values).encode(codec)
        if len(value) % 2:
            value += b"\x00" if vr == "UI" else b" "
        length = len(value)
        if implicit:
            header = struct.pack("<HHI", tag >> 16, tag & 0xFFFF, length)
        elif vr in _LONG_VRS:
            header = struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr.encode(), 0, length)
        elif length <= 0xFFFF:
            header = struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), length)
        else:
            return None
        parts += (header, value)
        element = RawDataElement(BaseTag(tag), vr, length, value, 0, implicit, True, True, False)
        if tag >> 16 & 1:
            ds[tag] = element  # private: pydicom ties it to its creator
        else:
            held[element.tag] = element
    state = ds.__dict__  # Dataset.set_original_encoding's attributes, and ours
    state["_read_implicit"], state["_read_little"] = implicit, True
    state["_read_charset"] = _UTF8 if utf8 else _DEFAULT
    state["encoded"], state["implicit"] = b"".join(parts), implicit
    return ds


def _encode(
    ds: Dataset, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False
) -> bytes | None:
    """pynetdicom's dataset encoder, sending an EncodedIdentifier's own bytes when they fit the context."""
    if (
        isinstance(ds, EncodedIdentifier)
        and is_little_endian
        and not deflated
        and ds.implicit == is_implicit_vr
    ):
        return ds.encoded
    return pynetdicom_encode(ds, is_implicit_vr, is_little_endian, deflated)


def install() -> None:
    """Route the service classes' encoding of response identifiers through `_encode` (idempotent)."""
    pynetdicom.service_class.encode = _encode  # type: ignore[attr-defined]
