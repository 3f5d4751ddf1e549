"""The standard attributes the index keeps in columns, and how a DICOM JSON value becomes a column value.

One registry serves both directions: ingest derives column values from an instance's DICOM JSON with it, and
the QIDO compiler maps query keys to columns and match rules with it. Normalisation of person names and
dates lives here, once, so that what is written and what is queried always agree.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from dicomcore.dicomjson import first_value


class Level(StrEnum):
    STUDY = "study"
    SERIES = "series"
    INSTANCE = "instance"


class Match(StrEnum):
    """How a query value for the attribute is matched (PS3.4 C.2.2.2)."""

    UID = "uid"  # single value or list of UIDs
    STRING = "string"  # single value, wildcard (* ?), list (backslash)
    PN = "pn"  # like STRING but case-insensitive; fuzzymatching on name components
    DATE = "date"  # DA single value or range
    TIME = "time"  # TM single value or range
    INT = "int"  # IS single value or list
    MULTI = "multi"  # a multi-valued string column (text[]): matches when any value matches


@dataclass(frozen=True, slots=True)
class Attribute:
    keyword: str
    tag: int
    vr: str
    level: Level
    column: str
    match: Match

    @property
    def key(self) -> str:
        """The DICOM JSON key (GGGGEEEE)."""
        return f"{self.tag:08X}"


def _a(keyword: str, tag: int, vr: str, level: Level, column: str, match: Match) -> Attribute:
    return Attribute(keyword, tag, vr, level, column, match)


ST, SE, IN = Level.STUDY, Level.SERIES, Level.INSTANCE

# Matching keys of PS3.18 Table 10.6.1-5 plus Azure v2's additions (StudyDescription, PatientBirthDate,
# ManufacturerModelName, PerformedProcedureStepStartDate) and a few common extras.
ATTRIBUTES: tuple[Attribute, ...] = (
    _a("StudyInstanceUID", 0x0020000D, "UI", ST, "study_instance_uid", Match.UID),
    _a("PatientID", 0x00100020, "LO", ST, "patient_id", Match.STRING),
    _a("PatientName", 0x00100010, "PN", ST, "patient_name_ci", Match.PN),
    _a("PatientBirthDate", 0x00100030, "DA", ST, "patient_birth_date", Match.DATE),
    _a("PatientSex", 0x00100040, "CS", ST, "patient_sex", Match.STRING),
    _a("StudyDate", 0x00080020, "DA", ST, "study_date", Match.DATE),
    _a("StudyTime", 0x00080030, "TM", ST, "study_time", Match.TIME),
    _a("AccessionNumber", 0x00080050, "SH", ST, "accession_number", Match.STRING),
    _a("ReferringPhysicianName", 0x00080090, "PN", ST, "referring_physician_name_ci", Match.PN),
    _a("StudyID", 0x00200010, "SH", ST, "study_id", Match.STRING),
    _a("StudyDescription", 0x00081030, "LO", ST, "study_description", Match.STRING),
    _a("ModalitiesInStudy", 0x00080061, "CS", ST, "modalities", Match.MULTI),
    _a("SeriesInstanceUID", 0x0020000E, "UI", SE, "series_instance_uid", Match.UID),
    _a("Modality", 0x00080060, "CS", SE, "modality", Match.STRING),
    _a("SeriesNumber", 0x00200011, "IS", SE, "series_number", Match.INT),
    _a("SeriesDescription", 0x0008103E, "LO", SE, "series_description", Match.STRING),
    _a(
        "PerformedProcedureStepStartDate",
        0x00400244,
        "DA",
        SE,
        "performed_procedure_step_start_date",
        Match.DATE,
    ),
    _a(
        "PerformedProcedureStepStartTime",
        0x00400245,
        "TM",
        SE,
        "performed_procedure_step_start_time",
        Match.TIME,
    ),
    _a("ManufacturerModelName", 0x00081090, "LO", SE, "manufacturer_model_name", Match.STRING),
    _a("SOPInstanceUID", 0x00080018, "UI", IN, "sop_instance_uid", Match.UID),
    _a("SOPClassUID", 0x00080016, "UI", IN, "sop_class_uid", Match.UID),
    _a("InstanceNumber", 0x00200013, "IS", IN, "instance_number", Match.INT),
)

BY_TAG: dict[int, Attribute] = {a.tag: a for a in ATTRIBUTES}

# Computed attributes (PS3.18 Table 10.6.3-2..4): returned, never stored in attrs, not matchable.
COMPUTED = {
    0x00080061: "ModalitiesInStudy",
    0x00201206: "NumberOfStudyRelatedSeries",
    0x00201208: "NumberOfStudyRelatedInstances",
    0x00201209: "NumberOfSeriesRelatedInstances",
}


# --- value normalisation: one definition for ingest and query --------------------------------------


def fold_case(text: str) -> str:
    """Case-insensitive form used for literal PN matching; trailing empty components and padding are
    dropped, since `Doe^John^^` and `Doe^John` are the same name (PS3.5 6.2, PN)."""
    return text.rstrip("^ ").casefold()


def fold_accents(text: str) -> str:
    """Accent- and case-insensitive form used for fuzzy PN matching."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


_NAME_SPLIT = re.compile(r"[\^=\s,]+")


def name_words(name: str) -> list[str]:
    """The components of a person name (all groups), folded for fuzzy matching, without empties."""
    return [w for w in _NAME_SPLIT.split(fold_accents(name)) if w]


def pn_alphabetic(value: Any) -> str | None:
    """The alphabetic group of a DICOM JSON PN value; literal matching compares against it."""
    if isinstance(value, dict):
        return value.get("Alphabetic")
    if isinstance(value, str):
        return value.split("=", 1)[0]
    return None


def pn_all_groups(value: Any) -> str:
    if isinstance(value, dict):
        return "=".join(value.get(k, "") for k in ("Alphabetic", "Ideographic", "Phonetic"))
    return str(value or "")


def parse_da(text: str) -> dt.date | None:
    """DA value (YYYYMMDD) to a date; None when malformed (the raw value stays in the metadata)."""
    text = text.strip()
    if len(text) == 10 and text[4] == "." and text[7] == ".":  # ACR-NEMA style, still seen in old data
        text = text.replace(".", "")
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


_TM_RE = re.compile(r"(\d{2})(?::?(\d{2})(?::?(\d{2})(?:\.(\d{1,6}))?)?)?")


def parse_tm(text: str) -> dt.time | None:
    """TM value (HH[MM[SS[.FFFFFF]]]) to a time; None when malformed."""
    m = _TM_RE.fullmatch(text.strip())
    if not m:
        return None
    hh, mm, ss, frac = m.groups()
    try:
        micro = int((frac or "0").ljust(6, "0"))
        second = int(ss or 0)
        second = min(second, 59)  # leap second 60 is legal in TM; time() does not accept it
        return dt.time(int(hh), int(mm or 0), second, micro)
    except ValueError:
        return None


_IS_MIN, _IS_MAX = -(2**31), 2**31 - 1  # PS3.5 6.2: the range of IS (and of the integer columns)


def parse_is(value: Any) -> int | None:
    """IS value to an int; None when malformed or outside IS's range (the raw value stays in the
    metadata), so that an invalid value in a real file cannot fail the index write of its batch."""
    if isinstance(value, int):
        number = value
    else:
        try:
            number = int(str(value).strip())
        except (TypeError, ValueError):
            return None
    return number if _IS_MIN <= number <= _IS_MAX else None


# Longer than any valid value of an indexed text attribute (a PN of three 64-character groups is the
# longest), short enough for a btree entry (PostgreSQL refuses entries over ~2.7 kB, 4 bytes a character).
MAX_INDEXED_CHARS = 256


def indexable(text: str) -> str:
    """A text value as its column holds it: without NULs (PostgreSQL text cannot hold them; DICOM text has
    none, but files do) and cut to MAX_INDEXED_CHARS. Only invalid values change, the metadata keeps them
    whole, and a wildcard query on their start still finds them."""
    if "\x00" in text:
        text = text.replace("\x00", "")
    return text[:MAX_INDEXED_CHARS]


# --- column values of one level from an instance's DICOM JSON ---------------------------------------


def _text(attrs: dict, key: str) -> str | None:
    value = first_value(attrs, key)
    return None if value is None else indexable(str(value))


def _person_name(attrs: dict, key: str) -> tuple[str | None, str | None]:
    """(all groups, alphabetic group) of a PN attribute, each as a column can hold it."""
    value = first_value(attrs, key)
    if value is None:
        return None, None
    alphabetic = pn_alphabetic(value)
    return indexable(pn_all_groups(value)), None if alphabetic is None else indexable(alphabetic)


def study_columns(attrs: dict) -> dict[str, Any]:
    """Column values of the study row (patient attributes included: they are matched at study level)."""
    patient_name, pn_alpha = _person_name(attrs, "00100010")
    referring, ref_alpha = _person_name(attrs, "00080090")
    return {
        "patient_id": _text(attrs, "00100020"),
        "patient_name": patient_name,
        "patient_name_ci": fold_case(pn_alpha) if pn_alpha is not None else None,
        "patient_name_words": name_words(patient_name) if patient_name else [],
        "patient_birth_date": parse_da(_text(attrs, "00100030") or ""),
        "patient_sex": _text(attrs, "00100040"),
        "study_date": parse_da(_text(attrs, "00080020") or ""),
        "study_time": parse_tm(_text(attrs, "00080030") or ""),
        "accession_number": _text(attrs, "00080050"),
        "referring_physician_name": referring,
        "referring_physician_name_ci": fold_case(ref_alpha) if ref_alpha is not None else None,
        "referring_physician_name_words": name_words(referring) if referring else [],
        "study_id": _text(attrs, "00200010"),
        "study_description": _text(attrs, "00081030"),
    }


def series_columns(attrs: dict) -> dict[str, Any]:
    return {
        "modality": _text(attrs, "00080060"),
        "series_number": parse_is(first_value(attrs, "00200011")),
        "series_description": _text(attrs, "0008103E"),
        "performed_procedure_step_start_date": parse_da(_text(attrs, "00400244") or ""),
        "performed_procedure_step_start_time": parse_tm(_text(attrs, "00400245") or ""),
        "manufacturer_model_name": _text(attrs, "00081090"),
    }


def instance_columns(attrs: dict) -> dict[str, Any]:
    return {
        "instance_number": parse_is(first_value(attrs, "00200013")),
        "rows": parse_is(first_value(attrs, "00280010")),
        "columns": parse_is(first_value(attrs, "00280011")),
        "bits_allocated": parse_is(first_value(attrs, "00280100")),
        "number_of_frames": parse_is(first_value(attrs, "00280008")),
    }


def patient_identity(attrs: dict) -> tuple[str, str]:
    """(PatientID, IssuerOfPatientID), empty strings when absent: the key of the patient row."""
    return (_text(attrs, "00100020") or "", _text(attrs, "00100021") or "")
