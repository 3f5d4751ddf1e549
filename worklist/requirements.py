"""Attribute requirements of a UPS by operation: PS3.4 Table CC.2.5-3, "Unified Procedure Step Attribute
Requirements" (SOP Common, Scheduled Procedure Information, Relationship, Progress Information and
Performed Procedure Information modules), the top-level attributes and the items the archive checks.
Encoded by hand from the current (2024-era) table; not yet compared line by line with one published
edition, so treat a disagreement with the standard as a bug here.

Keywords, tags and VRs come from the data dictionary (dicomcore.tags, i.e. pydicom's); the requirement
types are not machine-readable anywhere we could depend on, so they are encoded here by hand, for the SCU
side of each column:

* create (N-CREATE): "1" present with a value, "2" present (may be empty), "3" optional, "1C"/"2C"
  conditional on the workflow (checked as optional: the conditions name facts the archive cannot know),
  "-" set by the archive (a value sent is replaced, with the "created with modifications" warning),
  "E" present only empty (Transaction UID: a new item has no owner).
* update (N-SET): "3" may be changed, "1" may be changed but not emptied, "-" not allowed (400).
* final: "R" present before COMPLETED or CANCELED (with a value when create is "1"), "P" present with a
  value before COMPLETED, "O" no requirement.

Sequences list the requirements of their items; code sequences (`code=True`) have Code Sequence Macro
items (PS3.3 Table 8.8-1: a code value, a coding scheme designator unless the value is a URN, a meaning).
Attributes not listed here may be stored too (type 3 everywhere), except that they may not be emptied.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dicomcore.tags import parse_tag, tag_hex


@dataclass(frozen=True)
class Req:
    create: str
    update: str
    final: str = "O"
    items: dict[str, Req] = field(default_factory=dict)
    code: bool = False


def _code(create: str = "2", update: str = "3", final: str = "O") -> Req:
    return Req(create, update, final, code=True)


_HUMAN_PERFORMER_ITEM = {
    "HumanPerformerCodeSequence": _code("1", "3"),
    "HumanPerformerName": Req("1", "3"),
    "HumanPerformerOrganization": Req("1", "3"),
}

_SOP_REFERENCE_ITEM = {
    "TypeOfInstances": Req("1", "3"),
    "StudyInstanceUID": Req("1C", "3"),
    "SeriesInstanceUID": Req("1C", "3"),
    "ReferencedSOPSequence": Req("1", "3"),
}

_PERFORMED_ITEM = {
    "ActualHumanPerformersSequence": Req("3", "3", "O", items=_HUMAN_PERFORMER_ITEM),
    "PerformedStationNameCodeSequence": _code("3", "3"),
    "PerformedStationClassCodeSequence": _code("3", "3"),
    "PerformedStationGeographicLocationCodeSequence": _code("3", "3"),
    "PerformedProcedureStepStartDateTime": Req("3", "3", "P"),
    "PerformedProcedureStepDescription": Req("3", "3"),
    "CommentsOnThePerformedProcedureStep": Req("3", "3"),
    "PerformedWorkitemCodeSequence": _code("3", "3"),
    "PerformedProcessingParametersSequence": Req("3", "3"),
    "PerformedProcedureStepEndDateTime": Req("3", "3", "P"),
    "OutputInformationSequence": Req("3", "3", "R", items=_SOP_REFERENCE_ITEM),  # present, may be empty
}

_PROGRESS_ITEM = {
    "ProcedureStepProgress": Req("3", "3"),
    "ProcedureStepProgressDescription": Req("3", "3"),
    "ProcedureStepProgressParametersSequence": Req("3", "3"),
    "ProcedureStepCommunicationsURISequence": Req("3", "3"),
    "ProcedureStepCancellationDateTime": Req("3", "3"),
    "ReasonForCancellation": Req("3", "3"),
    "ProcedureStepDiscontinuationReasonCodeSequence": _code("3", "3"),
}

_REQUEST_ITEM = {
    "StudyInstanceUID": Req("1", "3"),
    "AccessionNumber": Req("2", "3"),
    "IssuerOfAccessionNumberSequence": Req("3", "3"),
    "PlacerOrderNumberImagingServiceRequest": Req("3", "3"),
    "FillerOrderNumberImagingServiceRequest": Req("3", "3"),
    "RequestedProcedureID": Req("2", "3"),
    "RequestedProcedureDescription": Req("2", "3"),
    "RequestedProcedureCodeSequence": _code("2", "3"),
    "ReasonForTheRequestedProcedure": Req("3", "3"),
}

TABLE: dict[str, Req] = {
    # SOP Common Module
    "SpecificCharacterSet": Req("1C", "3"),
    "SOPClassUID": Req("-", "-", "R"),
    "SOPInstanceUID": Req("-", "-", "R"),
    # Unified Procedure Step Scheduled Procedure Information Module
    "ScheduledProcedureStepPriority": Req("1", "1", "R"),
    "ScheduledProcedureStepModificationDateTime": Req("-", "-"),
    "ProcedureStepLabel": Req("1", "1", "R"),
    "WorklistLabel": Req("3", "1", "R"),
    "ScheduledProcessingParametersSequence": Req("3", "3"),
    "ScheduledStationNameCodeSequence": _code(),
    "ScheduledStationClassCodeSequence": _code(),
    "ScheduledStationGeographicLocationCodeSequence": _code(),
    "ScheduledHumanPerformersSequence": Req("2C", "3", items=_HUMAN_PERFORMER_ITEM),
    "ScheduledProcedureStepStartDateTime": Req("1", "1", "R"),
    "ExpectedCompletionDateTime": Req("3", "3"),
    "ScheduledProcedureStepExpirationDateTime": Req("3", "3"),
    "ScheduledWorkitemCodeSequence": _code(),
    "CommentsOnTheScheduledProcedureStep": Req("2", "3"),
    "InputReadinessState": Req("1", "1", "R"),
    "InputInformationSequence": Req("2", "3", items=_SOP_REFERENCE_ITEM),
    "StudyInstanceUID": Req("1C", "3"),
    # Unified Procedure Step Relationship Module (patient and request)
    "PatientName": Req("2", "3", "R"),
    "PatientID": Req("2", "3", "R"),
    "IssuerOfPatientID": Req("2", "3"),
    "IssuerOfPatientIDQualifiersSequence": Req("2", "3"),
    "OtherPatientIDsSequence": Req("3", "3"),
    "PatientBirthDate": Req("2", "3", "R"),
    "PatientSex": Req("2", "3", "R"),
    "AdmissionID": Req("2", "3"),
    "IssuerOfAdmissionIDSequence": Req("2", "3"),
    "AdmittingDiagnosesDescription": Req("2", "3"),
    "AdmittingDiagnosesCodeSequence": _code(),
    "ReferencedRequestSequence": Req("2", "3", items=_REQUEST_ITEM),
    "ReplacedProcedureStepSequence": Req("1C", "3"),
    # Unified Procedure Step Progress Information Module
    "ProcedureStepState": Req("1", "-", "R"),
    "ProcedureStepProgressInformationSequence": Req("3", "3", items=_PROGRESS_ITEM),
    # Unified Procedure Step Performed Procedure Information Module
    "UnifiedProcedureStepPerformedProcedureSequence": Req("2", "3", "P", items=_PERFORMED_ITEM),
    # the lock: never part of a stored or returned data set (PS3.18 11.5.2)
    "TransactionUID": Req("E", "-"),
}


@dataclass(frozen=True)
class KeyedReq:
    """A Req with its items keyed by DICOM JSON key (GGGGEEEE), as validation walks a data set."""

    create: str
    update: str
    final: str
    code: bool
    items: dict[str, KeyedReq]


def keyed(table: dict[str, Req]) -> dict[str, KeyedReq]:
    return {
        tag_hex(parse_tag(name)): KeyedReq(req.create, req.update, req.final, req.code, keyed(req.items))
        for name, req in table.items()
    }


BY_KEY: dict[str, KeyedReq] = keyed(TABLE)

UPS_PUSH_SOP_CLASS = "1.2.840.10008.5.1.4.34.6.1"
UPS_EVENT_SOP_CLASS = "1.2.840.10008.5.1.4.34.6.4"
WORKLIST_SUBSCRIPTION_UID = "1.2.840.10008.5.1.4.34.5"
FILTERED_SUBSCRIPTION_UID = "1.2.840.10008.5.1.4.34.5.1"

# Code Sequence Macro keys
CODE_VALUE, CODING_SCHEME, CODE_MEANING = "00080100", "00080102", "00080104"
LONG_CODE_VALUE, URN_CODE_VALUE = "00080119", "00080120"

# enumerated values checked on every write (PS3.3 C.30.1, C.30.2)
ENUMERATED: dict[str, frozenset[str]] = {
    tag_hex(parse_tag("ScheduledProcedureStepPriority")): frozenset({"HIGH", "MEDIUM", "LOW"}),
    tag_hex(parse_tag("InputReadinessState")): frozenset({"READY", "UNAVAILABLE", "INCOMPLETE"}),
    tag_hex(parse_tag("ProcedureStepState")): frozenset(
        {"SCHEDULED", "IN PROGRESS", "COMPLETED", "CANCELED"}
    ),
}
