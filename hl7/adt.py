"""ADT messages as bulk updates of a patient's studies: A08 / A31 (update patient information) and A40
(merge patient).

A bulk update is an `update` operation (the `POST /studies/$bulkUpdate` operation, archive/update.py): its
parameters are the partition, the studies and the change data set (the new patient attributes, DICOM JSON),
checked and built by archive/update_request.py as for the HTTP route. It is created in the message's
transaction, so the message's AA means the update is queued durably; the operation runner of any process
applies it (and resumes it after a crash), updates of one study in the order they were queued.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from archive.update_request import UPDATE, UpdateRequest, parse_change_dataset, update_params
from hl7.handling import Outcome, Target
from hl7.message import (
    AE,
    DATA_TYPE_ERROR,
    REQUIRED_FIELD_MISSING,
    SEGMENT_SEQUENCE_ERROR,
    HL7Error,
    Received,
    Segment,
    segments,
)
from hl7.values import Identifier, element, identifiers, patient_attributes
from indexer.lookup import find_patient_studies
from indexer.operations import create_operation

PATIENT_ID, ISSUER_OF_PATIENT_ID = "00100020", "00100021"


def _pid(received: Received) -> Segment:
    found = segments(received, "PID")
    if not found:
        raise HL7Error(
            AE, SEGMENT_SEQUENCE_ERROR, f"{received.header.message_type} has no PID segment", "PID"
        )
    return found[0]


def _patient_ids(segment: Segment, name: str, field_number: int) -> list[Identifier]:
    found = identifiers(segment, field_number)
    if not found:
        raise HL7Error(
            AE,
            REQUIRED_FIELD_MISSING,
            f"{name}-{field_number} (patient identifier list) has no identifier",
            f"{name}^1^{field_number}",
        )
    return found


async def _queue(
    conn: asyncpg.Connection, target: Target, ids: list[Identifier], change: dict[str, Any], outcome: Outcome
) -> list[str]:
    """Bulk update operations for the studies of these identifiers; the study UIDs they cover."""
    if target.key is None:
        return []
    studies = await find_patient_studies(conn, target.key, [i.id for i in ids], [i.issuer for i in ids])
    if not studies:
        return []
    try:  # the bulk update's own checks, as POST /studies/$bulkUpdate makes them
        request = UpdateRequest(studies, parse_change_dataset(change))
    except ValueError as exc:
        raise HL7Error(
            AE, DATA_TYPE_ERROR, f"the patient's new attributes cannot be applied: {exc}", "PID"
        ) from exc
    op = await create_operation(
        conn, UPDATE, update_params(target.name, request), [f"studies/{uid}" for uid in studies]
    )
    outcome.result.setdefault("operations", []).append(op.id_hex)
    outcome.operations += 1
    return studies


def _names(ids: list[Identifier]) -> str:
    return ", ".join(f"{i.id} ({i.issuer})" if i.issuer else i.id for i in ids)


async def update_patient(conn: asyncpg.Connection, received: Received, target: Target) -> Outcome:
    """A08 / A31: the PID's name, birth date and sex onto every study of the patient it identifies."""
    pid = _pid(received)
    ids = _patient_ids(pid, "PID", 3)
    change = patient_attributes(pid)
    if not change:
        return Outcome(f"nothing to update: PID-5, PID-7 and PID-8 of {_names(ids)} are empty")
    outcome = Outcome()
    studies = await _queue(conn, target, ids, change, outcome)
    outcome.result["studies"] = studies
    outcome.detail = (
        f"{len(studies)} studies of patient {_names(ids)} queued for update"
        if studies
        else f"no studies of patient {_names(ids)} in partition {target.name}"
    )
    return outcome


async def merge_patients(conn: asyncpg.Connection, received: Received, target: Target) -> Outcome:
    """A40: the studies of each MRG-1 patient move to the PID patient before it (its Patient ID, its issuer
    when it has one, and its name, birth date and sex)."""
    pids, mrgs = segments(received, "PID"), segments(received, "MRG")
    if not mrgs:
        raise HL7Error(AE, SEGMENT_SEQUENCE_ERROR, "ADT^A40 has no MRG segment", "MRG")
    if len(pids) != len(mrgs):
        raise HL7Error(
            AE, SEGMENT_SEQUENCE_ERROR, f"ADT^A40 has {len(pids)} PID and {len(mrgs)} MRG segments: each "
            "merged patient is a PID followed by its MRG", "MRG",
        )  # fmt: skip
    outcome = Outcome()
    moved: list[str] = []
    details: list[str] = []
    for pid, mrg in zip(pids, mrgs, strict=True):
        survivors = _patient_ids(pid, "PID", 3)
        prior = _patient_ids(mrg, "MRG", 1)
        # the surviving identifier in the merged one's issuing authority, when it has one there
        survivor = next((s for s in survivors if s.issuer and s.issuer == prior[0].issuer), survivors[0])
        change = patient_attributes(pid)
        change[PATIENT_ID] = element("LO", survivor.id, pid, 3)
        if survivor.issuer:
            change[ISSUER_OF_PATIENT_ID] = element("LO", survivor.issuer, pid, 3)
        prior = [p for p in prior if p != survivor]
        studies = await _queue(conn, target, prior, change, outcome) if prior else []
        moved += studies
        details.append(f"{len(studies)} studies of {_names(prior) or '-'} move to {_names([survivor])}")
    outcome.result["studies"] = moved
    outcome.detail = "; ".join(details)
    return outcome
