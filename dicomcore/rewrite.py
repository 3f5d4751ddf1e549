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

import io
from collections.abc import Mapping
from typing import Any

import pydicom
from pydicom import config
from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VM
from pydicom.dataelem import DataElement
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
    with config.strict_reading():
        write_data_element(out, elem, encodings)
    return out.getvalue()


def apply_changes(data: bytes, changes: Mapping[str, Mapping[str, Any]]) -> bytes:
    """The object with each changed attribute (8-hex-digit key -> checked DICOM JSON element) set, at the
    top level of the data set; raises RewriteError when that is impossible."""
    new = {int(key, 16): _element(int(key, 16), element) for key, element in changes.items()}
    try:
        fp = io.BytesIO(data)
        read_preamble(fp, False)
        meta = pydicom.filereader._read_file_meta_info(fp)
        syntax = meta.get("TransferSyntaxUID")
    except Exception as exc:
        raise RewriteError(f"the stored object cannot be read: {exc}") from exc
    if syntax is None:
        raise RewriteError("the stored object has no transfer syntax in its file meta")
    if syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        return _rewrite_whole(data, new)
    implicit = syntax == IMPLICIT_VR_LITTLE_ENDIAN
    little = syntax != EXPLICIT_VR_BIG_ENDIAN
    start = fp.tell()
    # Top-level elements and where each begins: the generator leaves fp after the element it yields (large
    # values are skipped, not read).
    spans: list[tuple[int, int, int]] = []  # (tag, start, end)
    charset: list[str] | None = None
    try:
        elements = data_element_generator(fp, implicit, little, defer_size=256)
        for elem in elements:
            end = fp.tell()
            spans.append((int(elem.tag), start, end))
            if elem.tag == SPECIFIC_CHARACTER_SET and elem.value:
                raw = elem.value.decode("ascii", "replace") if isinstance(elem.value, bytes) else elem.value
                charset = [c.strip() for c in raw.split("\\")]
            start = end
    except Exception as exc:
        raise RewriteError(f"the stored object cannot be parsed: {exc}") from exc
    charset = charset or []
    if not _encodable(list(new.values()), charset):
        _check_widenable(charset)
        charset = [UTF8]
        new[SPECIFIC_CHARACTER_SET] = DataElement(SPECIFIC_CHARACTER_SET, "CS", UTF8)
    encodings = convert_encodings(charset or [""])
    parts: list[bytes | memoryview] = []
    view = memoryview(data)
    position = spans[0][1] if spans else len(data)
    parts.append(view[:position])
    pending = sorted(new)
    for tag, begin, end in spans:
        while pending and pending[0] < tag:
            parts.append(_encode(new[pending.pop(0)], encodings, implicit, little))
        if pending and pending[0] == tag:
            parts.append(_encode(new[pending.pop(0)], encodings, implicit, little))
        else:
            parts.append(view[begin:end])
        position = end
    for tag in pending:
        parts.append(_encode(new[tag], encodings, implicit, little))
    parts.append(view[position:])
    return b"".join(parts)


def _rewrite_whole(data: bytes, new: dict[int, DataElement]) -> bytes:
    """Deflated objects: pydicom reads the whole data set, sets the values and writes it deflated again."""
    ds = read_file(io.BytesIO(data), None)
    if transfer_syntax_uid(ds) != DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:  # pragma: no cover - checked above
        raise RewriteError("not a deflated object")
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
