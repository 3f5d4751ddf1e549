"""The FHIR R4 projection of a study (the DICOMcast idea): pure functions from DICOM JSON to FHIR JSON.

A study becomes an ImagingStudy whose subject is a Patient and whose endpoint is an Endpoint for this
archive's WADO-RS root. Resource ids are deterministic (UUIDv5 of the WADO-RS root and the UID), so the sync
can PUT by id: a replayed event overwrites the same resource instead of creating a second one, and two
archives (or two partitions) that hold the same Study Instance UID project to two resources, each with
its own endpoint.

Mapping (DICOM attribute -> FHIR element):

* ImagingStudy.identifier: Study Instance UID as `urn:dicom:uid` / `urn:oid:<uid>`; Accession Number as
  an identifier of type ACSN (HL7 v2 table 0203).
* ImagingStudy.started: Study Date + Study Time. FHIR requires a time zone with a time, so the time is kept
  only when Timezone Offset From UTC (0008,0201) is present; otherwise `started` is the date alone rather
  than a guessed zone.
* ImagingStudy.modality: the distinct Modality (0008,0060) of its series (DICOM's Modalities in Study),
  coded in the DICOM ontology (DCM). description: Study Description.
* series: uid, number (Series Number), modality (DCM code; `OT` when absent, as FHIR requires one),
  description, started (Series Date/Time, as above), numberOfInstances, instance[].
* instance: uid, sopClass (`urn:ietf:rfc:3986` / `urn:oid:<SOP Class UID>`), number (Instance Number).
* numberOfSeries / numberOfInstances are counted from the series and instances projected, so the counts and
  the lists always agree. Series and instances are ordered by number, then UID, so an unchanged study
  projects to byte-identical JSON (the sync then skips the PUT).
* Patient: identifier (the configured system, Patient ID; Issuer of Patient ID as the assigner's display),
  name (PN alphabetic group: family^given^middle^prefix^suffix), gender (M/F/O; anything else `unknown`),
  birthDate.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from dicomcore.dicomjson import first_value
from indexer.attributes import parse_da, parse_is, parse_tm

DICOM_UID_SYSTEM = "urn:dicom:uid"
DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
RFC3986_SYSTEM = "urn:ietf:rfc:3986"
IDENTIFIER_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0203"
CONNECTION_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
DEFAULT_PATIENT_SYSTEM = "urn:dicomweb-archive:patient-id"

GENDERS = {"M": "male", "F": "female", "O": "other"}
_TZ_RE = re.compile(r"([+-])(\d{2})(\d{2})")

# Keys of the DICOM JSON attributes the projection reads.
STUDY_UID, SERIES_UID, SOP_UID, SOP_CLASS = "0020000D", "0020000E", "00080018", "00080016"
MODALITY, SERIES_NUMBER, SERIES_DESCRIPTION = "00080060", "00200011", "0008103E"
SERIES_DATE, SERIES_TIME, INSTANCE_NUMBER = "00080021", "00080031", "00200013"
STUDY_DATE, STUDY_TIME, STUDY_DESCRIPTION, ACCESSION = "00080020", "00080030", "00081030", "00080050"
TIMEZONE = "00080201"
PATIENT_NAME, PATIENT_ID, ISSUER, BIRTH_DATE, SEX = "00100010", "00100020", "00100021", "00100030", "00100040"


@dataclass
class StudySnapshot:
    """A study as the archive holds it now: QIDO's study, series and instance results (DICOM JSON)."""

    study: dict
    series: list[dict] = field(default_factory=list)
    instances: list[dict] = field(default_factory=list)


def resource_id(*parts: str) -> str:
    """A FHIR id (<= 64 of [A-Za-z0-9-.]) that the same inputs always give."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "|".join(parts)))


def imaging_study_id(wado_root: str, study_uid: str) -> str:
    return resource_id(wado_root.rstrip("/"), study_uid)


def endpoint_id(wado_root: str) -> str:
    return resource_id(wado_root.rstrip("/"))


def patient_id(system: str, value: str) -> str:
    return resource_id("Patient", system, value)


def _text(attrs: dict, key: str) -> str | None:
    value = first_value(attrs, key)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def fhir_datetime(date: str | None, time: str | None, tz: str | None) -> str | None:
    """DICOM DA (+ TM + offset) as a FHIR dateTime; the date alone unless the zone is known."""
    day = parse_da(date or "")
    if day is None:
        return None
    clock = parse_tm(time or "") if time else None
    zone = _TZ_RE.fullmatch(tz.strip()) if tz else None
    if clock is None or zone is None:
        return day.isoformat()
    sign, hh, mm = zone.groups()
    stamp = clock.strftime("%H:%M:%S") + (
        f".{clock.microsecond:06d}".rstrip("0") if clock.microsecond else ""
    )
    return f"{day.isoformat()}T{stamp}{sign}{hh}:{mm}"


def _sort_key(number: int | None, uid: str) -> tuple[int, int, str]:
    return (0 if number is not None else 1, number or 0, uid)


def patient_identifier(study: dict, system: str = DEFAULT_PATIENT_SYSTEM) -> dict[str, Any] | None:
    """The Patient identifier a study's Patient ID gives (None: the study has no Patient ID)."""
    value = _text(study, PATIENT_ID)
    if value is None:
        return None
    identifier: dict[str, Any] = {"use": "usual", "system": system, "value": value}
    issuer = _text(study, ISSUER)
    if issuer:
        identifier["assigner"] = {"display": issuer}
    return identifier


def human_name(pn: Any) -> dict[str, Any] | None:
    alphabetic = pn.get("Alphabetic") if isinstance(pn, dict) else (str(pn) if pn else None)
    if not alphabetic:
        return None
    parts = [p.strip() for p in alphabetic.split("^")] + [""] * 5
    family, given, middle, prefix, suffix = parts[:5]
    name: dict[str, Any] = {
        "use": "usual",
        "text": " ".join(p for p in (prefix, given, middle, family, suffix) if p),
    }
    if family:
        name["family"] = family
    if given or middle:
        name["given"] = [p for p in (given, middle) if p]
    if prefix:
        name["prefix"] = [prefix]
    if suffix:
        name["suffix"] = [suffix]
    return name if name["text"] else None


def patient_resource(study: dict, resource_id_: str, identifier: dict[str, Any]) -> dict[str, Any]:
    patient: dict[str, Any] = {"resourceType": "Patient", "id": resource_id_, "identifier": [identifier]}
    name = human_name(first_value(study, PATIENT_NAME))
    if name:
        patient["name"] = [name]
    sex = _text(study, SEX)
    if sex is not None:
        patient["gender"] = GENDERS.get(sex.upper(), "unknown")
    birth = parse_da(_text(study, BIRTH_DATE) or "")
    if birth is not None:
        patient["birthDate"] = birth.isoformat()
    return patient


def endpoint_resource(wado_root: str) -> dict[str, Any]:
    """This archive's WADO-RS service root as a FHIR Endpoint."""
    root = wado_root.rstrip("/")
    return {
        "resourceType": "Endpoint",
        "id": endpoint_id(root),
        "status": "active",
        "connectionType": {"system": CONNECTION_TYPE_SYSTEM, "code": "dicom-wado-rs"},
        "name": "DICOMweb WADO-RS",
        "payloadType": [{"text": "DICOM"}],
        "payloadMimeType": ["application/dicom"],
        "address": root,
    }


def _modality(code: str | None) -> dict[str, str]:
    return {"system": DCM_SYSTEM, "code": code or "OT"}


def imaging_study_resource(
    snapshot: StudySnapshot, *, wado_root: str, patient_reference: str
) -> dict[str, Any]:
    """The ImagingStudy for a study's current state. `patient_reference` is e.g. `Patient/<id>`."""
    study = snapshot.study
    study_uid = _text(study, STUDY_UID)
    if study_uid is None:
        raise ValueError("the study result has no StudyInstanceUID")
    series_attrs = {uid: s for s in snapshot.series if (uid := _text(s, SERIES_UID))}
    by_series: dict[str, list[dict]] = {}
    for instance in snapshot.instances:
        series_uid = _text(instance, SERIES_UID)
        if series_uid is not None and _text(instance, SOP_UID) is not None:
            by_series.setdefault(series_uid, []).append(instance)

    series_out: list[tuple[tuple[int, int, str], dict[str, Any]]] = []
    for series_uid, instances in by_series.items():
        # series attributes from the series result; an instance carries the defaults if that raced
        attrs = series_attrs.get(series_uid, instances[0])
        number = parse_is(first_value(attrs, SERIES_NUMBER))
        entry: dict[str, Any] = {"uid": series_uid}
        if number is not None and number >= 0:
            entry["number"] = number
        entry["modality"] = _modality(_text(attrs, MODALITY))
        description = _text(attrs, SERIES_DESCRIPTION)
        if description:
            entry["description"] = description
        entry["numberOfInstances"] = len(instances)
        started = fhir_datetime(_text(attrs, SERIES_DATE), _text(attrs, SERIES_TIME), _text(study, TIMEZONE))
        if started:
            entry["started"] = started
        entry["instance"] = [item for _, item in sorted(map(_instance, instances), key=lambda pair: pair[0])]
        series_out.append((_sort_key(number, series_uid), entry))
    series_out.sort(key=lambda pair: pair[0])

    resource: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "id": imaging_study_id(wado_root, study_uid),
        "identifier": [{"use": "official", "system": DICOM_UID_SYSTEM, "value": f"urn:oid:{study_uid}"}],
        "status": "available",
    }
    accession = _text(study, ACCESSION)
    if accession:
        resource["identifier"].append(
            {
                "use": "usual",
                "type": {"coding": [{"system": IDENTIFIER_TYPE_SYSTEM, "code": "ACSN"}]},
                "value": accession,
            }
        )
    modalities = sorted({s["modality"]["code"] for _, s in series_out})
    if modalities:
        resource["modality"] = [_modality(code) for code in modalities]
    resource["subject"] = {"reference": patient_reference}
    started = fhir_datetime(_text(study, STUDY_DATE), _text(study, STUDY_TIME), _text(study, TIMEZONE))
    if started:
        resource["started"] = started
    resource["endpoint"] = [{"reference": f"Endpoint/{endpoint_id(wado_root)}"}]
    resource["numberOfSeries"] = len(series_out)
    resource["numberOfInstances"] = sum(len(s["instance"]) for _, s in series_out)
    description = _text(study, STUDY_DESCRIPTION)
    if description:
        resource["description"] = description
    if series_out:
        resource["series"] = [s for _, s in series_out]
    return resource


def _instance(attrs: dict) -> tuple[tuple[int, int, str], dict[str, Any]]:
    uid = _text(attrs, SOP_UID) or ""
    number = parse_is(first_value(attrs, INSTANCE_NUMBER))
    item: dict[str, Any] = {"uid": uid}
    sop_class = _text(attrs, SOP_CLASS)
    item["sopClass"] = {"system": RFC3986_SYSTEM, "code": f"urn:oid:{sop_class or ''}"}
    if number is not None and number >= 0:
        item["number"] = number
    return _sort_key(number, uid), item


def same_content(
    a: dict[str, Any] | None, b: dict[str, Any], ignore: Iterable[str] = ("meta", "text")
) -> bool:
    """Whether a stored resource already says what `b` says (server-managed elements ignored)."""
    if a is None:
        return False
    skip = set(ignore)
    return {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}
