"""HL7 v2 data types read as DICOM JSON values (PS3.18 F.2): XPN names, TS dates, CX identifiers, CE codes.

Each function reads one field of a python-hl7 segment and returns the DICOM JSON element, or None when the
field is empty; a value DICOM cannot hold is an `HL7Error` (AE, data type error) naming the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from hl7.message import AE, DATA_TYPE_ERROR, TABLE_VALUE_NOT_FOUND, HL7Error, Segment, repetitions, value
from indexer.attributes import parse_da
from indexer.extended_values import dt_bounds

# Longest values of the VRs written here (PS3.5 Table 6.2-1); a longer HL7 value is refused rather than cut
MAX_LENGTH = {"SH": 16, "LO": 64, "CS": 16, "PN": 64}
LOCAL_SCHEME = "99HL7"  # coding scheme of HL7 codes sent without one (a private scheme: "99" prefix)


def where(segment: Segment, field: int) -> str:
    return f"{segment.name}^1^{field}"


def element(vr: str, text: str | None, segment: Segment, field: int) -> dict[str, Any] | None:
    """A single-valued element, or None for an empty value; AE when it is longer than its VR allows."""
    if not text:
        return None
    limit = MAX_LENGTH.get(vr)
    if limit is not None and len(text) > limit:
        raise HL7Error(
            AE,
            DATA_TYPE_ERROR,
            f"{segment.name}-{field} {text!r} is longer than DICOM {vr} allows ({limit} characters)",
            where(segment, field),
        )
    if "\\" in text:
        raise HL7Error(
            AE, DATA_TYPE_ERROR, f"{segment.name}-{field} {text!r} holds a backslash", where(segment, field)
        )
    return {"vr": vr, "Value": [text]}


def person_name(segment: Segment, field: int) -> dict[str, Any] | None:
    """XPN (family^given^middle^suffix^prefix^degree^type) as PN (family^given^middle^prefix^suffix): the
    legal name (type L) when the field repeats, else the first."""
    count = repetitions(segment, field)
    chosen = 1
    for rep in range(1, count + 1):
        if value(segment, field, rep, 7) == "L":
            chosen = rep
            break
    family = value(segment, field, chosen, 1)  # FN's surname (first subcomponent)
    given, middle, suffix, prefix = (value(segment, field, chosen, c) for c in (2, 3, 4, 5))
    name = "^".join([family, given, middle, prefix, suffix]).rstrip("^")
    if not name:
        return None
    for part in (family, given, middle, prefix, suffix):
        if "=" in part or "\\" in part or len(part) > MAX_LENGTH["PN"]:
            reason = f"{segment.name}-{field}: {part!r} is not a name component DICOM can hold"
            raise HL7Error(AE, DATA_TYPE_ERROR, reason, where(segment, field))
    return {"vr": "PN", "Value": [{"Alphabetic": name}]}


_TS = re.compile(r"([0-9]{4,14})(\.[0-9]{1,4})?([+-][0-9]{4})?")


def timestamp(segment: Segment, field: int, component: int = 1) -> str | None:
    """A TS / DTM value (YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ]) as DICOM DT text; AE when it is not
    one."""
    text = value(segment, field, component=component)
    if not text:
        return None
    m = _TS.fullmatch(text)
    if m is None or len(m.group(1)) % 2 or dt_bounds(text) is None:
        raise HL7Error(
            AE,
            DATA_TYPE_ERROR,
            f"{segment.name}-{field} {text!r} is not an HL7 date/time",
            where(segment, field),
        )
    return text


def date(segment: Segment, field: int) -> dict[str, Any] | None:
    """A TS as DA (its date part; a time of birth is dropped)."""
    text = timestamp(segment, field)
    if text is None:
        return None
    day = text[:8]
    if len(day) < 8 or parse_da(day) is None:
        raise HL7Error(
            AE, DATA_TYPE_ERROR, f"{segment.name}-{field} {text!r} is not a full date", where(segment, field)
        )
    return {"vr": "DA", "Value": [day]}


# HL7 table 0001 (Administrative Sex) -> DICOM Patient's Sex (M, F, O); U (unknown) leaves it empty
_SEX = {"M": "M", "F": "F", "O": "O", "A": "O", "N": "O", "X": "O"}


def sex(segment: Segment, field: int) -> dict[str, Any] | None:
    text = value(segment, field).upper()
    if not text or text == "U":
        return None
    if text not in _SEX:
        raise HL7Error(
            AE,
            TABLE_VALUE_NOT_FOUND,
            f"{segment.name}-{field} {text!r} is not an administrative sex (HL7 table 0001)",
            where(segment, field),
        )
    return {"vr": "CS", "Value": [_SEX[text]]}


@dataclass(frozen=True, slots=True)
class Identifier:
    """A CX: the ID and its assigning authority's namespace (DICOM Issuer of Patient ID), "" when none."""

    id: str
    issuer: str


def identifiers(segment: Segment, field: int) -> list[Identifier]:
    """Every repetition of a CX list (PID-3, MRG-1) that has an ID."""
    out = []
    for rep in range(1, repetitions(segment, field) + 1):
        ident = value(segment, field, rep, 1)
        if ident:
            out.append(Identifier(ident, value(segment, field, rep, 4, 1)))
    return out


def code(segment: Segment, field: int, *, component: int = 1) -> dict[str, Any] | None:
    """A CE / CWE (identifier^text^coding system) as a Code Sequence Macro item; the text is the meaning
    (the code itself when there is none; cut to 64 characters), a code without a system gets LOCAL_SCHEME."""
    base = component - 1
    ident = value(segment, field, 1, base + 1)
    if not ident:
        return None
    meaning = value(segment, field, 1, base + 2) or ident
    scheme = value(segment, field, 1, base + 3) or LOCAL_SCHEME
    return {
        "00080100": element("SH", ident, segment, field),
        "00080102": element("SH", scheme, segment, field),
        "00080104": {"vr": "LO", "Value": [meaning[:64]]},  # a description cut short still names the code
    }


def patient_attributes(pid: Segment) -> dict[str, Any]:
    """Patient's Name, Birth Date and Sex from a PID segment (those of its fields that have values)."""
    out: dict[str, Any] = {}
    for key, read in (("00100010", person_name), ("00100030", date), ("00100040", sex)):
        elem = read(pid, {"00100010": 5, "00100030": 7, "00100040": 8}[key])
        if elem is not None:
            out[key] = elem
    return out
