"""DICOM JSON model (PS3.18 F.2) encoding of pydicom datasets, with bulk data left in place.

Written here rather than using pydicom's Dataset.to_json_dict because (a) bulk data must never be read into
memory: large binary values are referenced by their byte offset in the stored object, which needs the raw
(unconverted) elements pydicom keeps for deferred values, and (b) a BulkDataURI needs the attribute's path
inside nested sequences, which pydicom's bulk-data callback does not receive.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from dicomcore.tags import dictionary_vr

BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
NUMBER_VRS = frozenset({"DS", "FL", "FD", "IS", "SL", "SS", "UL", "US", "SV", "UV"})
# Pixel data attributes are always bulk data, whatever their size: viewers fetch them as frames.
ALWAYS_BULK_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
# Binary values up to this size are inlined (base64); larger ones become BulkDataURIs.
INLINE_BINARY_LIMIT = 256
UNDEFINED_LENGTH = 0xFFFFFFFF

# The stored metadata holds BulkDataURIs relative to the instance's WADO-RS URL; responses prefix them.
BULK_PATH_PREFIX = "bulkdata/"


@dataclass(frozen=True, slots=True)
class BulkRef:
    """Where one bulk data value lies in the stored object (offset and length of the value bytes)."""

    path: str  # e.g. "7FE00010" or "00400275/0/00081110/..." for values inside sequences
    offset: int | None  # byte offset of the value in the file; None when not addressable (deflated, nested)
    length: int  # UNDEFINED_LENGTH for encapsulated values
    vr: str


def _vr_of(raw: RawDataElement | DataElement) -> str:
    vr = raw.VR
    if vr is None:
        vr = dictionary_vr(raw.tag) or "UN"
    return vr


def _string_values(value: Any) -> list[Any]:
    if isinstance(value, (list, MultiValue)):
        items = list(value)
    else:
        items = [value]
    return [None if v is None or v == "" else str(v) for v in items]


def _pn_value(value: Any) -> dict[str, str] | None:
    text = str(value) if value is not None else ""
    if not text:
        return None
    groups = text.split("=")
    result = {}
    for name, group in zip(("Alphabetic", "Ideographic", "Phonetic"), groups, strict=False):
        if group:
            result[name] = group
    return result or None


def _number(value: Any) -> Any:
    if value is None or value == "":
        return None
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        f = float(value)
        # JSON has no NaN/Infinity: keep the original text rather than emit an invalid number
        return f if math.isfinite(f) else str(value)
    try:
        f = float(str(value))
    except ValueError:
        return str(value)
    if f.is_integer() and "." not in str(value) and "e" not in str(value).lower():
        return int(f)
    return f if math.isfinite(f) else str(value)


def _element_json(elem: DataElement, vr: str, path: str, bulk: list[BulkRef]) -> dict:
    out: dict[str, Any] = {"vr": vr}
    value = elem.value
    if vr == "SQ":
        items = [
            encode_dataset(item, bulk, f"{path}/{i}/", nested=True) for i, item in enumerate(value or [])
        ]
        if items:
            out["Value"] = items
        return out
    if value is None or (isinstance(value, (str, bytes, list, MultiValue)) and len(value) == 0):
        return out
    if vr == "PN":
        values = value if isinstance(value, (list, MultiValue)) else [value]
        out["Value"] = [_pn_value(v) for v in values]
    elif vr in NUMBER_VRS:
        values = value if isinstance(value, (list, MultiValue)) else [value]
        out["Value"] = [_number(v) for v in values]
    elif vr == "AT":
        values = value if isinstance(value, (list, MultiValue)) else [value]
        out["Value"] = [f"{int(v):08X}" for v in values]
    elif vr in BINARY_VRS:
        data = bytes(value)
        out["InlineBinary"] = base64.b64encode(data).decode("ascii")
    elif isinstance(value, PersonName):
        out["Value"] = [_pn_value(value)]
    else:
        out["Value"] = _string_values(value)
    return out


def encode_dataset(ds: Dataset, bulk: list[BulkRef], path: str = "", *, nested: bool = False) -> dict:
    """DICOM JSON object for ds; large binary values become BulkDataURIs recorded in `bulk`.

    File meta (group 0002) is not part of a dataset's DICOM JSON. Raw elements are converted one by one,
    except binary ones, which are referenced without reading their value.
    """
    out: dict[str, Any] = {}
    raw_dict = ds._dict  # raw access: converting via ds[tag] would read deferred bulk values
    for tag in sorted(raw_dict):
        if tag >> 16 == 0x0002:
            continue
        raw = raw_dict[tag]
        vr = _vr_of(raw)
        key = f"{tag:08X}"
        elem_path = f"{path}{key}"
        if vr in BINARY_VRS:
            length, tell = _binary_extent(raw)
            if length is not None and (tag in ALWAYS_BULK_TAGS or length > INLINE_BINARY_LIMIT):
                offset = None if nested else tell
                bulk.append(BulkRef(elem_path, offset, length, vr))
                out[key] = {"vr": vr, "BulkDataURI": BULK_PATH_PREFIX + elem_path}
                continue
        elem = ds[tag]
        # pydicom resolves implicit-VR and UN elements against the dictionary on conversion
        vr = elem.VR if elem.VR else vr
        if vr in BINARY_VRS and elem.value is not None and len(elem.value) > INLINE_BINARY_LIMIT:
            bulk.append(BulkRef(elem_path, None, len(elem.value), vr))
            out[key] = {"vr": vr, "BulkDataURI": BULK_PATH_PREFIX + elem_path}
            continue
        out[key] = _element_json(elem, vr, elem_path, bulk)
    return out


def _binary_extent(raw: RawDataElement | DataElement) -> tuple[int | None, int | None]:
    """(value length, value offset) of a binary element without reading its value."""
    if isinstance(raw, RawDataElement):
        length = raw.length
        if raw.value is not None and length == UNDEFINED_LENGTH:
            # an encapsulated value that was read whole: its fragments start at value_tell
            return len(raw.value), raw.value_tell
        return length, raw.value_tell
    value = raw.value
    return (len(value) if value is not None else 0), None


def values_of(attrs: dict, key: str) -> list[Any]:
    """The Value list of one attribute of a DICOM JSON object ([] when absent or empty)."""
    entry = attrs.get(key)
    if not entry:
        return []
    return entry.get("Value") or []


def first_value(attrs: dict, key: str) -> Any:
    values = values_of(attrs, key)
    return values[0] if values else None


def select(attrs: dict, keys: Iterable[str]) -> dict:
    """The sub-object holding just the given attribute keys (those present)."""
    return {k: attrs[k] for k in keys if k in attrs}
