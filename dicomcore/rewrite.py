"""Changing top-level attributes of a stored PS3.10 object, every other byte kept (the bulk update's rewrite).

The new object is the old one with the changed elements' bytes replaced, or new elements inserted in tag
order: file meta, transfer syntax, pixel data and every other element stay byte for byte what they were, and
nothing is decoded but the changed elements and the character set. Deflated objects cannot be spliced;
pydicom inflates, changes and deflates them again (their inflated bytes are kept).

Element values arrive as DICOM JSON (PS3.18 F.2) and are checked here against the data dictionary and
pydicom's value rules for the VR (length, character repertoire, date/time syntax), so a bad value is refused
before anything is written.
"""

from __future__ import annotations

import bisect
import io
from collections.abc import Mapping
from typing import Any

import pydicom
from pydicom import config
from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VM
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import data_element_generator, read_preamble
from pydicom.filewriter import write_data_element
from pydicom.valuerep import validate_value

from dicomcore.framing import read_file, transfer_syntax_uid
from dicomcore.tags import dictionary_vr, keyword
from dicomcore.uids import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
)

SPECIFIC_CHARACTER_SET = 0x00080005
DEFER_SIZE = 64  # values longer than this are not read to find where the elements are
UNDEFINED_LENGTH = 0xFFFFFFFF
# explicit VR elements whose header is 12 bytes (2 reserved bytes and a 4-byte length), PS3.5 7.1.2
_LONG_HEADER_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
UTF8 = "ISO_IR 192"
_PN_GROUPS = frozenset({"Alphabetic", "Ideographic", "Phonetic"})
_NUMERIC_STRING = frozenset({"DS", "IS"})


class RewriteError(ValueError):
    """The stored object cannot take the change (not parseable, or a value its character set cannot hold)."""


def label(tag: int) -> str:
    """How messages name an attribute: keyword and tag."""
    return f"{keyword(tag)} ({tag >> 16:04X},{tag & 0xFFFF:04X})"


def check_element(tag: int, element: Any) -> None:
    """Raise ValueError (with the reason) unless `element` is a DICOM JSON element that sets a value of the
    attribute: its dictionary VR, a non-empty Value of values valid for that VR. Sequences are not taken."""
    name = label(tag)
    vr = dictionary_vr(tag)
    if vr is None or " or " in vr or vr == "SQ":
        raise ValueError(f"{name}: not an attribute whose value can be set")
    if not isinstance(element, dict):
        raise ValueError(f"{name}: an element is an object with 'vr' and 'Value'")
    if element.get("vr") != vr:
        raise ValueError(f"{name}: the VR is {vr}, not {element.get('vr')!r}")
    unknown = set(element) - {"vr", "Value"}
    if unknown:
        raise ValueError(f"{name}: only 'vr' and 'Value' are accepted, not {', '.join(sorted(unknown))}")
    values = element.get("Value")
    if not isinstance(values, list) or not values or any(v is None for v in values):
        raise ValueError(f"{name}: a value is required (an attribute cannot be updated to empty)")
    if len(values) > 1 and dictionary_VM(tag) == "1":
        raise ValueError(f"{name}: takes one value, not {len(values)}")
    for value in values:
        _check_value(name, vr, value)


def _check_value(name: str, vr: str, value: Any) -> None:
    if vr == "PN":
        if not isinstance(value, dict) or not value or not set(value) <= _PN_GROUPS:
            raise ValueError(f"{name}: a PN value is an object of Alphabetic, Ideographic, Phonetic strings")
        if not all(isinstance(v, str) for v in value.values()):
            raise ValueError(f"{name}: PN component groups are strings")
        text = "=".join(value.get(group, "") for group in ("Alphabetic", "Ideographic", "Phonetic")).rstrip(
            "="
        )
        checked: Any = text
    elif vr in _NUMERIC_STRING:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"{name}: {value!r} is not a number")
        checked = str(value)
    elif isinstance(value, str):
        checked = value
    else:
        raise ValueError(f"{name}: {value!r} is not a string")
    if "\\" in str(checked):
        raise ValueError(f"{name}: a value must not contain a backslash (it separates values)")
    if "\x00" in str(checked):  # no DICOM text holds one, nor PostgreSQL text (the operation's parameters)
        raise ValueError(f"{name}: a value must not contain a NUL character")
    try:
        validate_value(vr, checked, config.RAISE)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from exc


def _pn_text(value: Mapping[str, str]) -> str:
    """A PN value's DICOM form: its component groups joined by '=' (PS3.5 6.2)."""
    return "=".join(value.get(group, "") for group in ("Alphabetic", "Ideographic", "Phonetic")).rstrip("=")


def _element(tag: int, element: Mapping[str, Any]) -> DataElement:
    vr = element["vr"]
    values = [_pn_text(v) if vr == "PN" else str(v) for v in element["Value"]]
    return DataElement(tag, vr, values if len(values) > 1 else values[0])


def _is_default(charset: list[str]) -> bool:
    return all(c in ("", "ISO_IR 6") for c in charset)


def _encodable(elements: list[DataElement], charset: list[str]) -> bool:
    """Whether every value can be written in `charset` as it is, each value in one of its encodings.

    The default repertoire is ASCII (pydicom would write Latin-1 for it). Conservative for ISO 2022 sets: a
    value that would need to switch between them is taken as not encodable.
    """
    texts = [str(v) for e in elements for v in (e.value if isinstance(e.value, list) else [e.value])]
    if _is_default(charset):
        return all(text.isascii() for text in texts)
    encodings = convert_encodings(charset)
    for text in texts:
        for encoding in encodings:
            try:
                text.encode(encoding)
                break
            except (UnicodeError, LookupError):
                continue
        else:
            return False
    return True


def _check_widenable(charset: list[str]) -> None:
    """Only the default repertoire (ASCII) may become UTF-8 without re-encoding what is stored (ASCII is a
    subset of UTF-8); any other stored character set would need every text value re-encoded."""
    if any(c not in ("", "ISO_IR 6") for c in charset):
        raise RewriteError(
            f"the new values cannot be encoded in the object's character set {'/'.join(charset)}"
        )


def _encode(elem: DataElement, encodings: list[str], implicit: bool, little: bool) -> bytes:
    out = DicomBytesIO()
    out.is_implicit_VR, out.is_little_endian = implicit, little
    write_data_element(out, elem, encodings)
    return out.getvalue()


class Changes:
    """Checked changes (8-hex-digit key -> DICOM JSON element) to apply to many objects: each element is
    encoded once per transfer syntax and character set met."""

    def __init__(self, changes: Mapping[str, Mapping[str, Any]]) -> None:
        self.elements = {int(key, 16): _element(int(key, 16), element) for key, element in changes.items()}
        self._encoded: dict[tuple[bool, bool, tuple[str, ...]], dict[int, bytes]] = {}

    def _encoded_for(self, implicit: bool, little: bool, charset: list[str]) -> dict[int, bytes]:
        key = (implicit, little, tuple(charset))
        encoded = self._encoded.get(key)
        if encoded is None:
            elements = dict(self.elements)
            if not _encodable(list(elements.values()), charset):
                _check_widenable(charset)
                charset = [UTF8]
                elements[SPECIFIC_CHARACTER_SET] = DataElement(SPECIFIC_CHARACTER_SET, "CS", UTF8)
            encodings = convert_encodings(charset or [""])
            encoded = {tag: _encode(e, encodings, implicit, little) for tag, e in elements.items()}
            self._encoded[key] = encoded
        return encoded

    def apply(self, data: bytes) -> bytes:
        """The object with each attribute set at the top level of its data set; RewriteError when that is
        impossible."""
        try:
            ds = read_file(data, DEFER_SIZE)
            syntax = transfer_syntax_uid(ds)
        except Exception as exc:
            raise RewriteError(f"the stored object cannot be read: {exc}") from exc
        if syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
            return _rewrite_whole(read_file(data, None), dict(self.elements))  # values read: written whole
        implicit = syntax == IMPLICIT_VR_LITTLE_ENDIAN
        little = syntax != EXPLICIT_VR_BIG_ENDIAN
        encoded = self._encoded_for(implicit, little, _charset(ds))
        tags = sorted(encoded)
        edits = _edits(ds, tags, implicit, len(data))
        if edits is None:  # where the elements lie is not known from framing: frame them all
            edits = _edits_from_spans(_generated_spans(data, implicit, little), tags, len(data))
        view = memoryview(data)
        parts: list[bytes | memoryview] = []
        position = 0
        for start, end, tag in sorted(edits):
            parts.append(view[position:start])
            parts.append(encoded[tag])
            position = end
        parts.append(view[position:])
        return b"".join(parts)


def apply_changes(data: bytes, changes: Mapping[str, Mapping[str, Any]]) -> bytes:
    """The object with each changed attribute (8-hex-digit key -> checked DICOM JSON element) set, at the
    top level of the data set; raises RewriteError when that is impossible."""
    return Changes(changes).apply(data)


def _charset(ds: Dataset) -> list[str]:
    raw = ds._dict.get(SPECIFIC_CHARACTER_SET)
    value = raw.value if raw is not None else None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return [c.strip() for c in value.split("\\")] if isinstance(value, str) and value.strip() else []


def _extent(elem: Any, implicit: bool) -> tuple[int, int] | None:
    """Where a top-level element lies in the object, when framing recorded it (raw, defined length)."""
    if type(elem) is not RawDataElement or elem.length == UNDEFINED_LENGTH:
        return None
    header = 8 if implicit or elem.VR not in _LONG_HEADER_VRS else 12
    return elem.value_tell - header, elem.value_tell + elem.length


def _edits(ds: Dataset, tags: list[int], implicit: bool, size: int) -> list[tuple[int, int, int]] | None:
    """(start, end, tag): the bytes each changed element replaces (empty where it is inserted, before the
    first element with a higher tag); None when framing does not tell where that is."""
    elements = ds._dict
    order = list(elements)
    keys = [int(k) for k in order]
    if keys != sorted(keys):
        return None
    edits = []
    for tag in tags:
        n = bisect.bisect_left(keys, tag)
        if n < len(keys) and keys[n] == tag:
            extent = _extent(elements[order[n]], implicit)
        elif n == len(keys):
            extent = (size, size)
        elif (following := _extent(elements[order[n]], implicit)) is not None:
            extent = (following[0], following[0])
        elif n > 0 and (previous := _extent(elements[order[n - 1]], implicit)) is not None:
            extent = (previous[1], previous[1])
        else:
            extent = None
        if extent is None:
            return None
        edits.append((*extent, tag))
    return edits


def _edits_from_spans(
    spans: list[tuple[int, int, int]], tags: list[int], size: int
) -> list[tuple[int, int, int]]:
    """_edits from every top-level element's (tag, start, end)."""
    edits = []
    for tag in tags:
        following = next((span for span in spans if span[0] >= tag), None)
        if following is None:
            edits.append((size, size, tag))
        elif following[0] == tag:
            edits.append((following[1], following[2], tag))
        else:
            edits.append((following[1], following[1], tag))
    return edits


def _generated_spans(data: bytes, implicit: bool, little: bool) -> list[tuple[int, int, int]]:
    """(tag, start, end) of each top-level element by pydicom's element generator (slower: every element
    is framed in Python), which leaves the file after the element it yields; large values are skipped."""
    fp = io.BytesIO(data)
    try:
        read_preamble(fp, False)
        pydicom.filereader._read_file_meta_info(fp)
        start = fp.tell()
        spans = []
        for elem in data_element_generator(fp, implicit, little, defer_size=DEFER_SIZE):
            spans.append((int(elem.tag), start, fp.tell()))
            start = fp.tell()
    except Exception as exc:
        raise RewriteError(f"the stored object cannot be parsed: {exc}") from exc
    return spans


def _rewrite_whole(ds: Dataset, new: dict[int, DataElement]) -> bytes:
    """Deflated objects: pydicom reads the whole data set, sets the values and writes it deflated again."""
    value = ds.get("SpecificCharacterSet")
    charset = [value] if isinstance(value, str) else list(value or [])
    if not _encodable(list(new.values()), charset):
        _check_widenable(charset)
        ds.SpecificCharacterSet = UTF8
    for tag, elem in new.items():
        ds[tag] = elem
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()
