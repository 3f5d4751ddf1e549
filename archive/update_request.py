"""What a bulk update may change, and the checks of its request: shared by POST /studies/$bulkUpdate and the
HL7 listener (ADT^A08/A40), which both queue the same `update` operation.

The attributes are Azure's (the non-sequence attributes of the Patient Identification and Patient
Demographic modules) plus the patient's issuer and the study attributes a registration system corrects with
the patient (Accession Number, Study Description, Referring Physician's Name). UIDs are not changed here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dicomcore.rewrite import check_element, label
from dicomcore.uids import is_valid_uid

UPDATE = "update"  # the operation type

ALLOWED: frozenset[int] = frozenset(
    {
        # Patient Identification Module (PS3.3 C.2.2), as Azure lists it
        0x00100010,  # PatientName
        0x00100020,  # PatientID
        0x00100021,  # IssuerOfPatientID (not in Azure's list: an ID means nothing without its issuer)
        0x00100022,  # TypeOfPatientID
        0x00101000,  # OtherPatientIDs (retired)
        0x00101001,  # OtherPatientNames
        0x00101005,  # PatientBirthName
        0x00101060,  # PatientMotherBirthName
        0x00101090,  # MedicalRecordLocator (retired)
        # Patient Demographic Module (PS3.3 C.2.3), as Azure lists it
        0x00101010,  # PatientAge
        0x00102180,  # Occupation
        0x00403001,  # ConfidentialityConstraintOnPatientDataDescription
        0x00100030,  # PatientBirthDate
        0x00100032,  # PatientBirthTime
        0x00100040,  # PatientSex
        0x00100200,  # QualityControlSubject
        0x00101020,  # PatientSize
        0x00101030,  # PatientWeight
        0x00101040,  # PatientAddress
        0x00101080,  # MilitaryRank
        0x00101081,  # BranchOfService
        0x00102150,  # CountryOfResidence
        0x00102152,  # RegionOfResidence
        0x00102154,  # PatientTelephoneNumbers
        0x00102160,  # EthnicGroup
        0x001021F0,  # PatientReligiousPreference
        0x00104000,  # PatientComments
        0x00102297,  # ResponsiblePerson
        0x00102298,  # ResponsiblePersonRole
        0x00102299,  # ResponsibleOrganization
        0x00102201,  # PatientSpeciesDescription
        0x00102292,  # PatientBreedDescription
        0x00102295,  # BreedRegistrationNumber
        # General Study Module (PS3.3 C.7.2.1): what is corrected along with the patient
        0x00080050,  # AccessionNumber
        0x00081030,  # StudyDescription
        0x00080090,  # ReferringPhysicianName
    }
)


@dataclass(frozen=True, slots=True)
class UpdateRequest:
    study_instance_uids: list[str]
    change_dataset: dict[str, dict[str, Any]]  # 8 upper-case hex digits -> checked DICOM JSON element


def parse_change_dataset(obj: Any) -> dict[str, dict[str, Any]]:
    """The checked change dataset (keys upper-cased); ValueError naming what is wrong with it."""
    if not isinstance(obj, dict) or not obj:
        raise ValueError("changeDataset must be a DICOM JSON object with at least one attribute")
    out: dict[str, dict[str, Any]] = {}
    refused = []
    for raw_key, element in obj.items():
        if not isinstance(raw_key, str) or len(raw_key) != 8:
            raise ValueError(f"changeDataset: {raw_key!r} is not an attribute tag (8 hex digits)")
        try:
            tag = int(raw_key, 16)
        except ValueError:
            raise ValueError(f"changeDataset: {raw_key!r} is not an attribute tag (8 hex digits)") from None
        if tag not in ALLOWED:
            refused.append(label(tag))
            continue
        check_element(tag, element)
        out[f"{tag:08X}"] = {"vr": element["vr"], "Value": element["Value"]}
    if refused:
        raise ValueError(
            f"changeDataset: {', '.join(refused)} cannot be updated; a bulk update changes patient "
            "identification and demographic attributes, AccessionNumber, StudyDescription and "
            "ReferringPhysicianName (docs/conformance.md)"
        )
    return out


_FIELDS = {"studyinstanceuids": "studyInstanceUids", "changedataset": "changeDataset"}


def parse_update_request(body: Any) -> UpdateRequest:
    """Azure's body, {"studyInstanceUids": [...], "changeDataset": {...}}; ValueError with the reason."""
    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object with studyInstanceUids and changeDataset")
    # property names match case-insensitively, as Azure's (and this archive's export) request bodies do
    fields: dict[str, Any] = {}
    unknown = []
    for key, value in body.items():
        name = _FIELDS.get(key.lower())
        if name is None:
            unknown.append(key)
        elif name in fields:
            raise ValueError(f"{name} is given twice (property names match case-insensitively)")
        else:
            fields[name] = value
    if unknown:
        raise ValueError(f"unknown fields in the request body: {', '.join(sorted(unknown))}")
    body = fields
    uids = body.get("studyInstanceUids")
    if not isinstance(uids, list) or not uids:
        raise ValueError("studyInstanceUids must be a non-empty array of Study Instance UIDs")
    for uid in uids:
        if not isinstance(uid, str) or not is_valid_uid(uid):
            raise ValueError(f"studyInstanceUids: {uid!r} is not a valid UID")
    if "changeDataset" not in body:
        raise ValueError("changeDataset is required")
    return UpdateRequest(list(dict.fromkeys(uids)), parse_change_dataset(body["changeDataset"]))


def update_params(partition: str, request: UpdateRequest) -> dict[str, Any]:
    """The `update` operation's params, exactly as every front door queues them."""
    return {
        "partition": partition,
        "studyInstanceUids": request.study_instance_uids,
        "changeDataset": request.change_dataset,
    }
