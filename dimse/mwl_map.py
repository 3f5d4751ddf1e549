"""Modality Worklist keys as views of UPS work items: the mapping, the query it makes, the answers.

A scheduled UPS work item is one MWL entry: one Requested Procedure (its first Referenced Request Sequence
item) with one Scheduled Procedure Step (the work item itself). Each MWL key names a UPS-RS attribute path;
matching keys become filters of the worklist search (worklist/search.py), so an MWL query and a
`GET /workitems` with the same values select the same items through the same SQL. Keys without a UPS
counterpart are return keys only (answered zero length). docs/dimse.md has the table for humans.

Pure functions of pydicom data sets: no I/O, no pynetdicom.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from indexer.attributes import parse_tm
from worklist.search import Args, Filter, parse_filter, where_sql

SPS_SEQUENCE = 0x00400100  # Scheduled Procedure Step Sequence
SPECIFIC_CHARACTER_SET = 0x00080005
_START_DATE, _START_TIME = 0x00400002, 0x00400003
_END_DATE, _END_TIME = 0x00400004, 0x00400005
_SPS_ID, _SPS_STATUS = 0x00400009, 0x00400020
_START_DT, _END_DT = "ScheduledProcedureStepStartDateTime", "ExpectedCompletionDateTime"


@dataclass(frozen=True, slots=True)
class Key:
    """One MWL attribute: the UPS-RS attribute path it is read from, and whether it is a matching key."""

    mwl: str
    ups: str | None
    match: bool


# Attributes of the MWL identifier's top level (PS3.4 Table K.6-1), by their UPS source.
TOP = (
    Key("PatientName", "PatientName", True),
    Key("PatientID", "PatientID", True),
    Key("IssuerOfPatientID", "IssuerOfPatientID", True),
    Key("PatientBirthDate", "PatientBirthDate", True),
    Key("PatientSex", "PatientSex", True),
    Key("AdmissionID", "AdmissionID", True),
    Key("AccessionNumber", "ReferencedRequestSequence.AccessionNumber", True),
    Key(
        "IssuerOfAccessionNumberSequence", "ReferencedRequestSequence.IssuerOfAccessionNumberSequence", False
    ),
    Key("RequestedProcedureID", "ReferencedRequestSequence.RequestedProcedureID", True),
    Key("RequestedProcedureDescription", "ReferencedRequestSequence.RequestedProcedureDescription", True),
    Key("RequestedProcedureCodeSequence", "ReferencedRequestSequence.RequestedProcedureCodeSequence", False),
    Key("StudyInstanceUID", "ReferencedRequestSequence.StudyInstanceUID", True),
    Key(
        "PlacerOrderNumberImagingServiceRequest",
        "ReferencedRequestSequence.PlacerOrderNumberImagingServiceRequest",
        False,
    ),
    Key(
        "FillerOrderNumberImagingServiceRequest",
        "ReferencedRequestSequence.FillerOrderNumberImagingServiceRequest",
        False,
    ),
    Key("ReasonForTheRequestedProcedure", "ReferencedRequestSequence.ReasonForTheRequestedProcedure", False),
    Key("RequestedProcedurePriority", "ScheduledProcedureStepPriority", False),  # HIGH, MEDIUM, LOW
)

# Attributes of the Scheduled Procedure Step Sequence item. Start and end date/time, ID and status are
# computed (see `_sps_value`); the ID is `sps_id`'s, the status always SCHEDULED.
SPS = (
    Key("ScheduledStationAETitle", "ScheduledStationNameCodeSequence.CodeValue", True),
    Key("ScheduledStationName", "ScheduledStationNameCodeSequence.CodeMeaning", False),
    Key("ScheduledProcedureStepLocation", "ScheduledStationGeographicLocationCodeSequence.CodeValue", False),
    Key("Modality", "ScheduledStationClassCodeSequence.CodeValue", True),
    Key("ScheduledPerformingPhysicianName", "ScheduledHumanPerformersSequence.HumanPerformerName", True),
    Key("ScheduledProcedureStepDescription", "ProcedureStepLabel", True),
    Key("ScheduledProtocolCodeSequence", "ScheduledWorkitemCodeSequence", False),
    Key("ScheduledProcedureStepStartDate", _START_DT, True),
    Key("ScheduledProcedureStepStartTime", _START_DT, True),
    Key("ScheduledProcedureStepEndDate", _END_DT, False),
    Key("ScheduledProcedureStepEndTime", _END_DT, False),
    Key("ScheduledProcedureStepID", "ScheduledProcedureStepID", True),
    Key("ScheduledProcedureStepStatus", None, True),
)

_TOP = {tag_for_keyword(k.mwl): k for k in TOP}
_SPS = {tag_for_keyword(k.mwl): k for k in SPS}
_SPECIAL = {_START_DATE, _START_TIME, _END_DATE, _END_TIME, _SPS_ID, _SPS_STATUS}


class QueryError(ValueError):
    """An identifier the worklist cannot be searched with (status A900)."""


@dataclass
class Query:
    """What an MWL identifier asks: the worklist search's filters, and what they cannot express."""

    filters: list[Filter] = field(default_factory=list)
    time_of_day: tuple[str, str] | None = None  # a start time range without a date: checked per item
    impossible: bool = False  # a key no SCHEDULED work item can match (status other than SCHEDULED, ...)
    unsupported: list[str] = field(default_factory=list)  # matching values on return-only keys
    sps_ids: list[str] | None = (
        None  # Scheduled Procedure Step ID values (wildcards allowed): checked per item
    )


def _text(elem: DataElement) -> str:
    value = elem.value
    if value is None:
        return ""
    if isinstance(value, MultiValue):
        return "\\".join(str(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return str(value)


def _universal(value: str) -> bool:
    return value == "" or set(value) == {"*"}


def _time_digits(text: str) -> str:
    return text.replace(":", "")


def _range(text: str) -> tuple[str, str, bool]:
    if "-" in text:
        low, _, high = text.partition("-")
        return low.strip(), high.strip(), True
    return text.strip(), text.strip(), False


def _is_time(text: str) -> bool:
    """A TM value (HH[MM[SS[.F]]]) of a real time of day, as the worklist search checks its TM keys (a time
    with a date is checked there, as part of the date-time)."""
    return (
        bool(re.fullmatch(r"[0-9]{2}([0-9]{2}([0-9]{2}(\.[0-9]{1,6})?)?)?", text))
        and parse_tm(text) is not None
    )


def start_filter(date: str, time: str) -> tuple[str | None, tuple[str, str] | None]:
    """(the ScheduledProcedureStepStartDateTime value to search with, a time-of-day range for items) for
    an MWL Start Date and Start Time, matched combined as PS3.4 C.2.2.2.5.1 says: date a-b with time
    t1-t2 is the interval from a t1 to b t2."""
    date, time = date.strip(), _time_digits(time.strip())
    date, time = ("" if _universal(date) else date), ("" if _universal(time) else time)
    if not date:
        if not time:
            return None, None
        low, high, is_range = _range(time)
        if is_range and not low and not high:
            raise QueryError(f"ScheduledProcedureStepStartTime {time!r}: a range needs at least one end")
        if not all(_is_time(t) for t in (low, high) if t):
            raise QueryError(f"ScheduledProcedureStepStartTime {time!r} is not a time or time range")
        if low and high and low.replace(".", "").ljust(12, "0") > high.replace(".", "").ljust(12, "9"):
            raise QueryError(f"ScheduledProcedureStepStartTime {time!r}: the range ends before it starts")
        return None, (low, high)
    dlow, dhigh, drange = _range(date)
    if not time:
        return (f"{dlow}-{dhigh}" if drange else dlow), None
    tlow, thigh, trange = _range(time)
    if not drange and not trange:
        return dlow + tlow, None
    low = dlow + tlow if dlow else ""
    high = dhigh + thigh if dhigh else ""
    if not low and not high:
        return None, None
    return f"{low}-{high}", None


def parse_identifier(identifier: Dataset) -> Query:
    """The worklist search an MWL C-FIND identifier asks for (only SCHEDULED items, always)."""
    query = Query(filters=[parse_filter("ProcedureStepState", "SCHEDULED")])
    sps_items = identifier.get(SPS_SEQUENCE)
    sps = sps_items.value[0] if sps_items is not None and sps_items.VR == "SQ" and sps_items.value else None
    try:
        _add_keys(query, identifier, _TOP)
        if sps is not None:
            _add_keys(query, sps, _SPS)
            date = _text(sps[_START_DATE]) if _START_DATE in sps else ""
            time = _text(sps[_START_TIME]) if _START_TIME in sps else ""
            value, query.time_of_day = start_filter(date, time)
            if value:
                query.filters.append(parse_filter(_START_DT, value))
            _add_special(query, sps)
        where_sql(
            query.filters, Args()
        )  # compiled once here so that a bad value is A900, not a failure later
    except ValueError as exc:  # SearchError included: the value's syntax does not fit its VR
        raise QueryError(str(exc)) from exc
    return query


def _add_keys(query: Query, ds: Dataset, table: dict[int, Key]) -> None:
    for elem in ds:
        if elem.tag in (SPS_SEQUENCE, SPECIFIC_CHARACTER_SET) or elem.tag in _SPECIAL or elem.tag.group == 0:
            continue
        key = table.get(elem.tag)
        if elem.VR == "SQ":
            if elem.value and any(len(item) for item in elem.value):
                query.unsupported.append(elem.keyword or str(elem.tag))  # sequence matching: not supported
            continue
        value = _text(elem)
        if _universal(value):
            continue
        if key is None or not key.match or key.ups is None:
            query.unsupported.append(elem.keyword or str(elem.tag))
            continue
        query.filters.append(parse_filter(key.ups, value))


def _add_special(query: Query, sps: Dataset) -> None:
    if _SPS_ID in sps:
        value = _text(sps[_SPS_ID])
        if not _universal(value):
            query.sps_ids = value.split("\\")
    if _SPS_STATUS in sps:
        value = _text(sps[_SPS_STATUS])
        if not _universal(value) and "SCHEDULED" not in value.split("\\"):
            query.impossible = True


SPS_ID_LENGTH = 16  # VR SH


def sps_id(item: Dataset) -> str:
    """The Scheduled Procedure Step ID of a work item (SH: at most 16 characters). Its own, where it has one
    that fits (an HL7 order's IPC-4 or OBR-20 keeps it); otherwise 16 hex digits of the SHA-256 of its SOP
    Instance UID, stable for the item's life: the UID itself (up to 64 characters) is no valid SH, and a
    modality that copies the ID into its images or MPPS would truncate or refuse it."""
    own = str(item.get("ScheduledProcedureStepID", "") or "").strip()
    if own and len(own) <= SPS_ID_LENGTH:
        return own
    digest = hashlib.sha256(str(item.get("SOPInstanceUID", "")).encode("ascii", "replace")).hexdigest()
    return digest[:SPS_ID_LENGTH].upper()


def sps_id_matches(item: Dataset, values: list[str]) -> bool:
    """List or single value matching of the item's SPS ID, `*` and `?` allowed (PS3.4 C.2.2.2)."""
    ident = sps_id(item)
    for value in values:
        pattern = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in value)
        if re.fullmatch(pattern, ident, re.DOTALL):
            return True
    return False


def time_of_day_matches(item: Dataset, bounds: tuple[str, str]) -> bool:
    """Whether the work item's scheduled start time of day lies in [low, high] (either may be open)."""
    start = _dt_parts(_value(item, _START_DT))
    if start is None or not start[1]:
        return False
    time = start[1].ljust(12, "0")
    low, high = bounds
    return (not low or time >= low.replace(".", "").ljust(12, "0")) and (
        not high or time <= high.replace(".", "").ljust(12, "9")
    )


# --- answers ------------------------------------------------------------------------------------------------


def _value(item: Dataset, path: str | None) -> Any:
    """The value at a UPS attribute path (keywords, dots through the first item of each sequence)."""
    if path is None:
        return None
    node: Any = item
    parts = path.split(".")
    for n, part in enumerate(parts):
        elem = node.get(part) if isinstance(node, Dataset) else None
        if elem is None:
            return None
        value = elem.value if isinstance(elem, DataElement) else elem
        if n == len(parts) - 1:
            return value
        if not value:
            return None
        node = value[0]
    return None


def _dt_parts(value: Any) -> tuple[str, str] | None:
    """(date, time) of a DT value, its UTC offset dropped (the archive matches DT without offsets too)."""
    if not value:
        return None
    m = re.fullmatch(r"([0-9]{8})([0-9]{2,6}(?:\.[0-9]{1,6})?)?([+-][0-9]{4})?", str(value).strip())
    if m is None:
        return None
    return m.group(1), m.group(2) or ""


def _sps_value(tag: int, item: Dataset) -> Any:
    if tag in (_START_DATE, _START_TIME, _END_DATE, _END_TIME):
        parts = _dt_parts(_value(item, _START_DT if tag in (_START_DATE, _START_TIME) else _END_DT))
        if parts is None:
            return None
        return parts[0] if tag in (_START_DATE, _END_DATE) else parts[1] or None
    if tag == _SPS_STATUS:
        return "SCHEDULED"
    if tag == _SPS_ID:
        return sps_id(item)
    key = _SPS[tag]
    return _value(item, key.ups)


def _element(tag: int, vr: str, value: Any, requested: DataElement | None) -> DataElement:
    if vr == "SQ":
        items = [Dataset(i) for i in value] if value else []
        template = requested.value[0] if requested is not None and requested.value else None
        if template is not None and len(template):
            items = [_project(i, template) for i in items]
        return DataElement(tag, "SQ", items)
    if value is None or value == "":
        return DataElement(tag, vr, None)
    return DataElement(tag, vr, value)


def _project(source: Dataset, template: Dataset) -> Dataset:
    """The attributes of `source` that a sequence item of the request names (zero length when absent)."""
    out = Dataset()
    for elem in template:
        have = source.get(elem.tag)
        out.add(_element(elem.tag, elem.VR, have.value if have is not None else None, elem))
    return out


def _vr(tag: int, requested: DataElement) -> str:
    vr = requested.VR
    if vr in ("UN", "", None) or " or " in str(vr):
        try:
            vr = dictionary_VR(tag).split(" or ")[0]
        except KeyError:
            vr = "UN"
    return vr


def answer(identifier: Dataset, item: Dataset) -> Dataset:
    """The pending response identifier for one work item: every requested key, zero length when the item
    has no value for it; a zero-length Scheduled Procedure Step Sequence gets every SPS key this mapping
    has (PS3.4 C.2.2.2.6 universal sequence matching)."""
    out = Dataset()
    for elem in identifier:
        tag = int(elem.tag)
        if elem.tag.group == 0 or tag == SPECIFIC_CHARACTER_SET:
            continue
        if tag == SPS_SEQUENCE:
            template = elem.value[0] if elem.VR == "SQ" and elem.value and len(elem.value[0]) else None
            out.add(DataElement(tag, "SQ", [_sps_item(item, template)]))
            continue
        key = _TOP.get(tag)
        vr = _vr(tag, elem)
        out.add(_element(tag, vr, _value(item, key.ups) if key else None, elem))
    if _needs_unicode(out):
        out.SpecificCharacterSet = "ISO_IR 192"
    elif SPECIFIC_CHARACTER_SET in identifier:
        out.add(DataElement(SPECIFIC_CHARACTER_SET, "CS", None))
    return out


def _sps_item(item: Dataset, template: Dataset | None) -> Dataset:
    out = Dataset()
    requested: Iterable[tuple[int, DataElement | None]]
    if template is None:
        requested = ((t, None) for t in _SPS)
    else:
        requested = ((int(e.tag), e) for e in template)
    for tag, elem in requested:
        vr = _vr(tag, elem) if elem is not None else dictionary_VR(tag)
        value = _sps_value(tag, item) if tag in _SPS else None
        out.add(_element(tag, vr, value, elem))
    return out


def _needs_unicode(ds: Dataset) -> bool:
    for elem in ds:
        if elem.VR == "SQ":
            if any(_needs_unicode(i) for i in elem.value):
                return True
        elif elem.VR in ("PN", "LO", "SH", "ST", "LT", "UT", "UC") and elem.value is not None:
            if not _text(elem).isascii():
                return True
    return False


__all__ = [
    "SPS",
    "TOP",
    "Key",
    "Query",
    "QueryError",
    "answer",
    "parse_identifier",
    "sps_id",
    "sps_id_matches",
    "time_of_day_matches",
]
