"""C-FIND identifiers (PS3.4 Annex C) as QIDO query pairs; QIDO's DICOM JSON results as response identifiers.

The matching itself is the QIDO compiler's (indexer.qido): this module only translates. Each element of the
request identifier with a value becomes a matching pair (`GGGGEEEE` -> the value as DICOM text: ranges,
backslash lists and wildcards mean in QIDO what they mean in C-FIND), each zero-length one a return key
(includefield). The hierarchical rules of the Patient and Study Root models (PS3.4 C.4.1.2.2.1, C.4.1.3.1) are
checked here: the unique keys of the levels above the query level must be single values, and they become the
scope of the QIDO search (a study, a series) or, for PatientID, an exact matching key.

What QIDO cannot match is not refused: an optional key the index has no column or extended query tag for,
a sequence key's item values, and a value given for RetrieveAETitle or InstanceAvailability are not matched
(the entity's own value is returned), and the responses carry status 0xFF01 (PS3.4 C.4.1.1.4: "one or more
Optional Keys were not supported"). Keys QIDO does know but refuses (a malformed date, a key of a lower
level with a value) are a QueryError: the caller answers 0xA900 with QIDO's reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from dicomcore.tags import tag_hex
from dicomcore.uids import is_valid_uid
from dimse.raw_identifiers import RAW_VRS, text_values
from dimse.raw_identifiers import build as raw_dataset
from indexer.attributes import BY_TAG, Level
from indexer.extended_tags import ExtendedTag

PATIENT_ROOT = "1.2.840.10008.5.1.4.1.2.1.1"  # Patient Root Query/Retrieve Information Model - FIND
STUDY_ROOT = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Query/Retrieve Information Model - FIND

SPECIFIC_CHARACTER_SET = 0x00080005
QUERY_RETRIEVE_LEVEL = 0x00080052
RETRIEVE_AE_TITLE = 0x00080054
INSTANCE_AVAILABILITY = 0x00080056
RETRIEVE_URL = 0x00081190
PATIENT_ID = 0x00100020
ISSUER_OF_PATIENT_ID = 0x00100021
STUDY_UID = 0x0020000D
SERIES_UID = 0x0020000E
# PATIENT level counters, computed from the matching studies' (find.py)
PATIENT_STUDIES, PATIENT_SERIES, PATIENT_INSTANCES = 0x00201200, 0x00201202, 0x00201204
PATIENT_COUNTERS = frozenset({PATIENT_STUDIES, PATIENT_SERIES, PATIENT_INSTANCES})
STUDY_SERIES, STUDY_INSTANCES = 0x00201206, 0x00201208

# keys answered here rather than by QIDO: always ONLINE, the archive's AE title, no URL over DIMSE
_LOCAL = frozenset({RETRIEVE_AE_TITLE, INSTANCE_AVAILABILITY, RETRIEVE_URL})

# QueryRetrieveLevel -> the QIDO level searched, per model
LEVELS: dict[str, dict[str, Level]] = {
    PATIENT_ROOT: {
        "PATIENT": Level.STUDY,
        "STUDY": Level.STUDY,
        "SERIES": Level.SERIES,
        "IMAGE": Level.INSTANCE,
    },
    STUDY_ROOT: {"STUDY": Level.STUDY, "SERIES": Level.SERIES, "IMAGE": Level.INSTANCE},
}

_BINARY = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})

IDENTIFIER_DOES_NOT_MATCH = 0xA900  # Identifier does not match SOP class


class IdentifierError(ValueError):
    """An identifier the model's rules refuse; the caller answers `status`, the message as ErrorComment."""

    def __init__(self, message: str, offending: int | None = None, status: int = IDENTIFIER_DOES_NOT_MATCH):
        super().__init__(message)
        self.status = status
        self.offending = offending


@dataclass(frozen=True, slots=True)
class RequestKey:
    """One key of the request: returned in every response, with the entity's value or zero-length."""

    tag: int
    vr: str
    # a sequence key with an item: the item's keys, which alone are returned in each item (None: all of them)
    item_keys: tuple[RequestKey, ...] | None = None


@dataclass(slots=True)
class FindRequest:
    """A C-FIND identifier read for the QIDO compiler."""

    model: str
    level: str  # PATIENT, STUDY, SERIES or IMAGE
    qido_level: Level
    keys: list[RequestKey]  # requested keys, QueryRetrieveLevel and SpecificCharacterSet aside
    pairs: list[tuple[str, str]] = field(default_factory=list)  # QIDO matching pairs, then includefield
    study_uid: str | None = None  # QIDO scope (the unique keys of the levels above)
    series_uid: str | None = None
    unsupported: list[str] = field(default_factory=list)  # keys whose values were not matched
    single_study: str | None = None  # the one study asked for, if so (for the audit record)

    @property
    def tags(self) -> frozenset[int]:
        return frozenset(k.tag for k in self.keys)


def read_identifier(model: str, identifier: Dataset, extended: Mapping[int, ExtendedTag]) -> FindRequest:
    """The QIDO form of a C-FIND identifier of `model`; IdentifierError when the model's rules refuse it.

    `extended`: the defined extended query tags by tag (indexer.extended_tags.query_tags), which QIDO matches.
    """
    level = _level(model, identifier)
    request = FindRequest(model, level, LEVELS[model][level], [])
    scope = _scope(model, level)
    include: list[str] = []
    for elem in identifier:
        tag = int(elem.tag)
        if (
            tag in (SPECIFIC_CHARACTER_SET, QUERY_RETRIEVE_LEVEL)
            or elem.tag.element == 0
            or elem.tag.group < 8
        ):
            continue  # group lengths, command and file meta groups are not keys
        if elem.VR == "SQ":
            request.keys.append(_sequence_key(elem, request))
            include.append(tag_hex(tag))
            continue
        if elem.VR in _BINARY:  # returned, never matched (a private element a peer sent in implicit VR)
            request.keys.append(RequestKey(tag, elem.VR))
            if elem.value:
                request.unsupported.append(elem.keyword or tag_hex(tag))
            if level != "PATIENT" or elem.tag.group == 0x0010:
                include.append(tag_hex(tag))
            continue
        text = _text(elem)
        request.keys.append(RequestKey(tag, elem.VR))
        if tag in scope:
            _unique_key(request, elem, text)
            continue
        if tag in _LOCAL or (tag in PATIENT_COUNTERS and level == "PATIENT"):
            if text is not None and text.strip("* ") != "":
                request.unsupported.append(elem.keyword or tag_hex(tag))
            continue
        if level == "PATIENT" and elem.tag.group != 0x0010:
            if text is not None:
                raise IdentifierError(
                    f"{elem.keyword or tag_hex(tag)} is not a key of the PATIENT level", tag
                )
            continue  # returned zero-length: patients have only patient attributes
        if text is None:
            include.append(tag_hex(tag))
        elif tag in BY_TAG or tag in extended:
            request.pairs.append((tag_hex(tag), text))
            if tag == STUDY_UID and _single(text):
                request.single_study = text
        else:
            request.unsupported.append(elem.keyword or tag_hex(tag))
            include.append(tag_hex(tag))
    if level == "PATIENT":
        include.append(tag_hex(ISSUER_OF_PATIENT_ID))  # patients are told apart by PatientID and issuer
    if include:
        request.pairs.append(("includefield", ",".join(dict.fromkeys(include))))
    _check_scope(request)
    return request


def _level(model: str, identifier: Dataset) -> str:
    elem = identifier.get(QUERY_RETRIEVE_LEVEL)
    value = _text(elem) if elem is not None else None
    allowed = ", ".join(LEVELS[model])
    if value is None:
        raise IdentifierError(f"QueryRetrieveLevel is missing: one of {allowed}", QUERY_RETRIEVE_LEVEL)
    level = value.strip().upper()
    if level not in LEVELS[model]:
        raise IdentifierError(f"QueryRetrieveLevel {value!r} is not one of {allowed}", QUERY_RETRIEVE_LEVEL)
    return level


def _scope(model: str, level: str) -> tuple[int, ...]:
    """The unique keys of the levels above `level`, which a hierarchical query must give as single values."""
    above: tuple[int, ...] = (PATIENT_ID,) if model == PATIENT_ROOT and level != "PATIENT" else ()
    if level in ("SERIES", "IMAGE"):
        above += (STUDY_UID,)
    if level == "IMAGE":
        above += (SERIES_UID,)
    return above


_SCOPE_NAMES = {PATIENT_ID: "PatientID", STUDY_UID: "StudyInstanceUID", SERIES_UID: "SeriesInstanceUID"}


def _check_scope(request: FindRequest) -> None:
    """Every unique key of the levels above the query level was given (single values: _unique_key)."""
    given = {
        PATIENT_ID: any(name == tag_hex(PATIENT_ID) for name, _ in request.pairs),
        STUDY_UID: request.study_uid is not None,
        SERIES_UID: request.series_uid is not None,
    }
    for tag in _scope(request.model, request.level):
        if not given[tag]:
            raise IdentifierError(
                f"{_SCOPE_NAMES[tag]} is required (a single value) at the {request.level} level", tag
            )


def _unique_key(request: FindRequest, elem: DataElement, text: str | None) -> None:
    """A unique key of a level above the query level: one value, no wildcard (PS3.4 C.4.1.2.2.1)."""
    tag, name = int(elem.tag), _SCOPE_NAMES[int(elem.tag)]
    value = (text or "").strip(" ")
    if not value or not _single(value) or "*" in value or "?" in value:
        raise IdentifierError(f"{name} must be a single value at the {request.level} level", tag)
    if tag == PATIENT_ID:
        request.pairs.append((tag_hex(tag), value))
        return
    if not is_valid_uid(value):
        raise IdentifierError(f"{name} {value!r} is not a valid UID", tag)
    if tag == STUDY_UID:
        request.study_uid = request.single_study = value
    else:
        request.series_uid = value


def _single(text: str) -> bool:
    return "\\" not in text


def _sequence_key(elem: DataElement, request: FindRequest) -> RequestKey:
    """A sequence key is a return key: QIDO has no sequence matching, so its item's values are not matched."""
    items = list(elem.value or [])
    if not items:
        return RequestKey(int(elem.tag), "SQ")
    keys = []
    for sub in items[0]:
        if sub.tag.element == 0:
            continue
        if sub.value:  # values in the item are not matched
            name = elem.keyword or tag_hex(int(elem.tag))
            if name not in request.unsupported:
                request.unsupported.append(name)
        keys.append(RequestKey(int(sub.tag), sub.VR))
    return RequestKey(int(elem.tag), "SQ", tuple(keys) or None)


def _text(elem: DataElement) -> str | None:
    """An element's value as DICOM text (values joined by backslash), None when it has none (a return key).

    pydicom has decoded the value with the identifier's character set already."""
    try:
        value = elem.value
    except Exception as exc:  # pydicom could not convert a malformed value
        raise IdentifierError(
            f"{elem.keyword or tag_hex(int(elem.tag))}: invalid value ({exc})", int(elem.tag)
        ) from exc
    if value is None or value == "" or value == b"":
        return None
    if isinstance(value, MultiValue | list | tuple):
        if not value:
            return None
        return "\\".join("" if v is None else str(v) for v in value)
    return str(value)


# --- responses ----------------------------------------------------------------------------------------


def response_identifier(
    request: FindRequest, result: Mapping[str, Any], ae_title: str, *, implicit: bool | None = None
) -> Dataset:
    """The pending response of one match: exactly the requested keys (zero-length where the entity has no
    value), QueryRetrieveLevel, and SpecificCharacterSet ISO_IR 192 when some value is not ASCII.

    `implicit`: the response's little-endian encoding (implicit VR or not), when known: text-only responses
    are then built already encoded (dimse.raw_identifiers), the same bytes at a tenth of the cost."""
    if implicit is not None and (raw := _raw_response(request, result, ae_title, implicit)) is not None:
        return raw
    found = _dataset(
        {tag_hex(k.tag): result[tag_hex(k.tag)] for k in request.keys if tag_hex(k.tag) in result}
    )
    ds = Dataset()
    ds.QueryRetrieveLevel = request.level
    scope = {STUDY_UID: request.study_uid, SERIES_UID: request.series_uid}
    for key in request.keys:
        if key.tag == RETRIEVE_AE_TITLE:
            ds.add_new(key.tag, "AE", ae_title)
        elif key.tag == INSTANCE_AVAILABILITY:
            ds.add_new(key.tag, "CS", "ONLINE")
        elif key.tag in found and key.tag != RETRIEVE_URL:
            ds.add(_shaped(found[key.tag], key))
        elif scope.get(key.tag):
            ds.add_new(key.tag, "UI", scope[key.tag])
        else:
            ds.add(_empty(key))
    if not _ascii(ds):
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


def _raw_response(
    request: FindRequest, result: Mapping[str, Any], ae_title: str, implicit: bool
) -> Dataset | None:
    """response_identifier's elements as raw ones; None when one of them needs pydicom (see the module)."""
    scope = {STUDY_UID: request.study_uid, SERIES_UID: request.series_uid}
    elements = [(QUERY_RETRIEVE_LEVEL, "CS", [request.level])]
    for key in request.keys:
        if key.tag == SPECIFIC_CHARACTER_SET or key.item_keys is not None:
            return None
        vr, values = key.vr, []
        if key.tag == RETRIEVE_AE_TITLE:
            vr, values = "AE", [ae_title]
        elif key.tag == INSTANCE_AVAILABILITY:
            vr, values = "CS", ["ONLINE"]
        elif (element := result.get(tag_hex(key.tag))) is not None and key.tag != RETRIEVE_URL:
            vr = element.get("vr", key.vr)
            if (found := text_values(vr, element)) is None:
                return None
            values = found
        elif scope.get(key.tag):
            vr, values = "UI", [scope[key.tag]]
        if vr not in RAW_VRS:  # sequences, binary and decimal values, private keys sent as UN
            return None
        elements.append((key.tag, vr, values))
    return raw_dataset(elements, implicit=implicit)


def _dataset(attrs: Mapping[str, Any]) -> Dataset:
    """DICOM JSON as a pydicom Dataset; bulk data (never asked for by C-FIND) is left out, as zero-length."""
    return Dataset.from_json({k: _without_bulk(v) for k, v in attrs.items()})


def _without_bulk(element: Any) -> Any:
    if not isinstance(element, dict):
        return element
    if "BulkDataURI" in element:
        return {"vr": element.get("vr", "UN")}
    if element.get("vr") == "SQ" and element.get("Value"):
        items = [
            {k: _without_bulk(v) for k, v in item.items()}
            for item in element["Value"]
            if isinstance(item, dict)
        ]
        return {**element, "Value": items}
    return element


def _empty(key: RequestKey) -> DataElement:
    if key.vr == "SQ":
        return DataElement(key.tag, "SQ", Sequence())
    return DataElement(key.tag, key.vr, None)


def _shaped(elem: DataElement, key: RequestKey) -> DataElement:
    """A returned sequence holds, in each item, only the keys of the request's item (all when it had none)."""
    if elem.VR != "SQ" or key.item_keys is None:
        return elem
    items = []
    for item in elem.value:
        shaped = Dataset()
        for sub in key.item_keys:
            shaped.add(_shaped(item[sub.tag], sub) if sub.tag in item else _empty(sub))
        items.append(shaped)
    return DataElement(key.tag, "SQ", Sequence(items))


def _ascii(ds: Dataset) -> bool:
    for elem in ds:
        if elem.VR == "SQ":
            if not all(_ascii(item) for item in elem.value):
                return False
            continue
        value = elem.value
        values = value if isinstance(value, MultiValue | list) else [value]
        if not all(str(v).isascii() for v in values if v is not None and not isinstance(v, bytes)):
            return False
    return True
