"""Storage Commitment Push Model SCP (PS3.4 Annex J): "do you hold these instances durably?"

The N-ACTION (Request Storage Commitment) is answered at once, once the request is recorded in PostgreSQL
(dimse/commitment_queue.py), so an accepted request survives a restart; the answer to the question comes
after, in an N-EVENT-REPORT (dimse.commitment_delivery sends it, from any process). An instance is
committed when its index row exists in the peer's partition with the SOP class the peer names: an index row
is committed only after its object is durable (docs/architecture.md, invariants), so the row is the proof.
The first attempt runs in a thread of its own, so the association's reactor is free to send the N-ACTION
response first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association

from dicomcore.uids import is_valid_uid
from dimse.aes import Service
from dimse.gateway import Gateway
from dimse.storescp import peer_of, response
from indexer.lookup import stored_sop_classes

if TYPE_CHECKING:
    from dimse.commitment_queue import Pending

log = logging.getLogger(__name__)

STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"  # Storage Commitment Push Model SOP Class
WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"
REQUEST_COMMITMENT = 1  # Action Type ID
ALL_COMMITTED, SOME_FAILED = 1, 2  # Event Type IDs

# N-ACTION statuses (PS3.7 10.1.4.1.10)
SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110
INVALID_ARGUMENT = 0x0115
INVALID_INSTANCE = 0x0117
NO_SUCH_ACTION = 0x0123
NOT_AUTHORIZED = 0x0124
# Failure Reasons (0008,1197) of the report (PS3.4 J.3.3.1.1)
NO_SUCH_OBJECT = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119

TRANSFER_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]  # Explicit and Implicit VR Little Endian


def register(ae: AE, gateway: Gateway) -> list[tuple[Any, ...]]:
    ae.add_supported_context(STORAGE_COMMITMENT, TRANSFER_SYNTAXES)
    return [(evt.EVT_N_ACTION, on_action, [gateway])]


@dataclass(frozen=True, slots=True)
class Request:
    transaction_uid: str
    references: list[tuple[str, str]]  # (SOP Class UID, SOP Instance UID), as the peer listed them


class RequestError(ValueError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def read_request(event: evt.Event) -> Request:
    """The N-ACTION's Transaction UID and Referenced SOP Sequence, or RequestError with the status."""
    request = event.request
    if str(request.RequestedSOPInstanceUID) != WELL_KNOWN_INSTANCE:
        raise RequestError(INVALID_INSTANCE, f"Requested SOP Instance UID must be {WELL_KNOWN_INSTANCE}")
    if event.action_type != REQUEST_COMMITMENT:
        raise RequestError(
            NO_SUCH_ACTION, f"Action Type ID {event.action_type} is not 1 (Request Commitment)"
        )
    try:
        info = event.action_information
        transaction = str(info.get("TransactionUID", "") or "")
        items = info.get("ReferencedSOPSequence") or []
        references = [
            (str(i.get("ReferencedSOPClassUID", "") or ""), str(i.get("ReferencedSOPInstanceUID", "") or ""))
            for i in items
        ]
    except Exception as exc:  # pydicom decodes lazily: a malformed data set fails here
        raise RequestError(INVALID_ARGUMENT, f"Action Information cannot be read: {exc}") from exc
    if not is_valid_uid(transaction):
        raise RequestError(INVALID_ARGUMENT, "Transaction UID (0008,1195) is missing or not a UID")
    if not references:
        raise RequestError(INVALID_ARGUMENT, "Referenced SOP Sequence (0008,1199) has no items")
    for sop_class, sop_instance in references:
        if not (is_valid_uid(sop_class) and is_valid_uid(sop_instance)):
            raise RequestError(
                INVALID_ARGUMENT, "a Referenced SOP Sequence item lacks a valid class or instance UID"
            )
    return Request(transaction, references)


def on_action(event: evt.Event, gateway: Gateway) -> tuple[Any, Dataset | None]:
    started = time.perf_counter()
    peer = peer_of(event)
    request: Request | None = None
    status, comment = SUCCESS, None
    if not peer.may(Service.COMMITMENT):
        status, comment = NOT_AUTHORIZED, f"AE {peer.ae.ae_title} may not request storage commitment"
    else:
        try:
            request = read_request(event)
        except RequestError as exc:
            status, comment = exc.status, str(exc)
    pending: Pending | None = None
    if request is not None:
        try:  # recorded before the answer: an accepted request is never lost
            pending = gateway.run(gateway.commitment_reports().accept(peer, request), timeout=30)
        except Exception as exc:
            log.warning("storage commitment %s: not recorded: %s", request.transaction_uid, exc)
            status, comment = PROCESSING_FAILURE, "the request could not be recorded; ask again"
    detail = (
        f"storage commitment {request.transaction_uid}: {len(request.references)} instances requested"
        if pending is not None and request is not None
        else comment
    )
    gateway.audit(
        subject=peer.subject, address=peer.address, operation="N-ACTION", action_code="E", status=status,
        failed=status != SUCCESS, started=started, partition=peer.ae.partition, detail=detail,
    )  # fmt: skip
    if pending is not None:
        # the report waits for this response: the thread's send pauses the reactor only after it is sent
        threading.Thread(
            target=first_attempt, args=(event.assoc, gateway, pending), name="commitment-report", daemon=True
        ).start()
    return (response(status, comment) if comment else status), None


def first_attempt(assoc: Association, gateway: Gateway, pending: Pending) -> None:
    """The report on the request's association (run in a thread of its own); the queue has it otherwise."""
    try:
        gateway.run(gateway.commitment_reports().first_attempt(assoc, pending))
    except Exception:  # a thread's exception would otherwise vanish into stderr; the claim runs out
        log.exception("storage commitment %s: first report attempt failed", pending.transaction_uid)


async def stored_classes(gateway: Gateway, partition: str, uids: Sequence[str]) -> dict[str, str]:
    """SOP Instance UID -> SOP Class UID of the given instances indexed in the partition."""
    key = await gateway.partition_key(partition)
    return {} if key is None else await stored_sop_classes(gateway.pool, key, uids)


def event_information(
    request: Request, stored: dict[str, str] | None, retrieve_ae: str
) -> tuple[int, Dataset, int, int]:
    """(Event Type ID, Event Information, committed, failed) for the stored classes found (None: the index
    could not be read, every instance fails with a processing failure)."""
    info = Dataset()
    info.TransactionUID = request.transaction_uid
    info.RetrieveAETitle = retrieve_ae
    committed, failed = [], []
    for sop_class, sop_instance in request.references:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        held = None if stored is None else stored.get(sop_instance)
        if held is not None and held == sop_class:
            committed.append(item)
            continue
        item.FailureReason = (
            PROCESSING_FAILURE
            if stored is None
            else NO_SUCH_OBJECT
            if held is None
            else CLASS_INSTANCE_CONFLICT
        )
        failed.append(item)
    if committed:
        info.ReferencedSOPSequence = committed
    if failed:
        info.FailedSOPSequence = failed
    return (SOME_FAILED if failed else ALL_COMMITTED), info, len(committed), len(failed)
