"""Which attributes belong to the study and series levels (PS3.3 modules), for the per-level attrs blobs.

QIDO returns a study's or series' attributes from these blobs, so includefield can name any attribute of the
level (and `includefield=all` returns all of them) without touching instance metadata. Everything in
groups 0010 (patient) is study level; the rest are listed from the modules named beside them.
"""

from __future__ import annotations

from typing import Any

import orjson

# Returned at every level (SOP Common).
COMMON = frozenset({"00080005", "00080201"})

STUDY_LEVEL = frozenset(
    {
        # General Study
        "0020000D", "00080020", "00080030", "00080090", "00080096", "0008009C", "00200010", "00080050",
        "00080051", "00081030", "00081048", "00081060", "00081032", "00401012", "00081110", "00321060",
        "00321033", "00321032", "00321034",
        # Patient Study
        "00081080", "00081084", "00101010", "00101020", "00101030", "00102180", "001021B0", "00102203",
        "001021A0", "001021C0", "00102000", "00102110", "00380010", "00380014", "00380060", "00380062",
        "00380064", "00101021", "00101022", "00101023", "00101024", "00380500", "00380050",
        # Clinical Trial Subject and Study
        "00120010", "00120020", "00120021", "00120030", "00120031", "00120040", "00120042", "00120050",
        "00120051", "00120052", "00120053", "00120071", "00120081", "00120082", "00120083", "00120084",
    }
)  # fmt: skip

SERIES_LEVEL = frozenset(
    {
        # General Series
        "0020000E", "00080060", "00200011", "0008103E", "00080021", "00080031", "00180015", "00185100",
        "00200060", "00081050", "00081052", "00181030", "00400244", "00400245", "00400250", "00400251",
        "00400253", "00400254", "00400260", "00400275", "00400280", "00081111", "00280108", "00280109",
        "00102210", "00081070", "00081072", "0008103F", "00080068",
        # General Equipment
        "00080070", "00080080", "00080081", "00081010", "00081040", "00081090", "00181000", "00181020",
        "00181008", "00181002", "00181050", "00181200", "00181201", "00280120", "0018100B",
        # Frame of Reference
        "00200052", "00201040",
        # Clinical Trial Series
        "00120060", "00120062", "00120071", "00120072", "00120073",
    }
)  # fmt: skip


def study_attrs(attrs: dict) -> dict:
    """The patient- and study-level attributes of an instance's DICOM JSON."""
    return {k: v for k, v in attrs.items() if k.startswith("0010") or k in STUDY_LEVEL or k in COMMON}


def series_attrs(attrs: dict) -> dict:
    """The series-level attributes of an instance's DICOM JSON."""
    return {k: v for k, v in attrs.items() if k in SERIES_LEVEL or k in COMMON}


def level_json(attrs: dict) -> bytes:
    """The attrs blob of a study or series row: `attrs` as JSON, without NULs in its strings.

    PostgreSQL's JSON parser refuses U+0000 (the row's trigger parses the blob, migration 0010) and DICOM
    text never holds one, but files do; the instance's own metadata keeps it. orjson writes a NUL as
    \\u0000, so the common case costs one search of the bytes."""
    blob = orjson.dumps(attrs)
    if b"\\u0000" not in blob:
        return blob
    return orjson.dumps(_without_nul(attrs))


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {k: _without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    return value
