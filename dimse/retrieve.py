"""C-MOVE and C-GET SCP (PS3.4 C.4.2, C.4.3), Patient Root and Study Root: stored objects sent as stored.

The instances a request names come from the index (indexer/lookup.py: one read per study, series or
patient list), in the peer's partition, and go out through dimse/sending.py: from the stored file, without
decoding, transcoded to an uncompressed syntax only when the receiver accepted nothing else.

Why this module answers the requests itself rather than through pynetdicom's C-GET/C-MOVE loop: that loop
takes decoded `Dataset`s only (it re-encodes each, in memory) and opens the C-MOVE association with fixed
statuses (a refusing destination becomes 0xA801, "destination unknown"). So the archive installs a
Query/Retrieve service class of its own for the four GET/MOVE SOP classes (`_RetrieveService`): it hands the
request to the handler bound here (with a `respond` callable on the event), and the handler sends pending
and final responses with pynetdicom's own DIMSE primitives. Associations not accepted by the archive's
listener (any other AE in the process) keep pynetdicom's behaviour.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import pynetdicom.association
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.dsutils import encode
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import QueryRetrieveServiceClass
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicomcore.uids import is_valid_uid
from dimse.aes import AeError, Service, check_ae_title, get_ae
from dimse.gateway import Gateway, Peer
from dimse.sending import SendCounts, associate, send_instances
from dimse.storescp import error_comment
from indexer.lookup import StoredInstance, find_instances, find_patient_studies

log = logging.getLogger(__name__)

PATIENT_ROOT = (
    str(PatientRootQueryRetrieveInformationModelMove),
    str(PatientRootQueryRetrieveInformationModelGet),
)
STUDY_ROOT = (str(StudyRootQueryRetrieveInformationModelMove), str(StudyRootQueryRetrieveInformationModelGet))

# C-MOVE / C-GET statuses (PS3.4 C.4.2.1.5, C.4.3.1.4)
SUCCESS = 0x0000
PENDING = 0xFF00
CANCEL = 0xFE00
WARNING = 0xB000  # sub-operations complete, one or more failures or warnings
NOT_AUTHORIZED = 0x0124
UNABLE_TO_CALCULATE = 0xA701  # out of resources: unable to calculate the number of matches
UNABLE_TO_PERFORM = 0xA702  # out of resources: unable to perform sub-operations
DESTINATION_UNKNOWN = 0xA801
IDENTIFIER_MISMATCH = 0xA900
UNABLE_TO_PROCESS = 0xC000
# Number of ... Sub-operations are US: a larger retrieval cannot report its counts
MAX_SUBOPERATIONS = 0xFFFF

_LEVEL_KEY = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}


class RetrieveError(Exception):
    """The request cannot be served: the final response carries `status` and the message as Error Comment."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def register(ae: AE, gateway: Gateway) -> list[tuple[Any, ...]]:
    for sop_class in (*PATIENT_ROOT, *STUDY_ROOT):
        ae.add_supported_context(sop_class)
    _install_service_class()
    C_MOVE.MoveDestination = _LENIENT_MOVE_DESTINATION  # type: ignore[method-assign]
    return [(evt.EVT_C_GET, _on_get, [gateway]), (evt.EVT_C_MOVE, _on_move, [gateway])]


# ---------------------------------------------------------------------------------------------------------
# The service class: hands the request to the handler, which answers it


class _RetrieveService(QueryRetrieveServiceClass):
    """pynetdicom's Query/Retrieve service class, except that on the archive's associations C-GET and C-MOVE
    are answered entirely by the bound handler (see the module's docstring)."""

    def _get_scp(self, req: C_GET, context: PresentationContext) -> None:
        if not hasattr(self.assoc, "archive_peer"):
            return super()._get_scp(req, context)
        self._delegate(req, context, evt.EVT_C_GET, C_GET)

    def _move_scp(self, req: C_MOVE, context: PresentationContext) -> None:
        if not hasattr(self.assoc, "archive_peer"):
            return super()._move_scp(req, context)
        self._delegate(req, context, evt.EVT_C_MOVE, C_MOVE)

    def _delegate(self, req: C_GET | C_MOVE, context: PresentationContext, event: Any, kind: type) -> None:
        context_id = context.context_id

        def respond(rsp: C_GET | C_MOVE) -> None:
            if self.assoc.is_established:  # the requestor may have released or aborted meanwhile
                self.dimse.send_msg(rsp, context_id)

        attrs = {"request": req, "context": context.as_tuple, "_is_cancelled": self.is_cancelled}
        try:
            evt.trigger(self.assoc, event, {**attrs, "respond": respond})
        except Exception as exc:  # a bug: the peer still gets a final answer
            log.exception("%s handler failed", kind.__name__)
            respond(_response(kind, req, UNABLE_TO_PROCESS, comment=f"{exc.__class__.__name__}: {exc}"))


_original_uid_to_service_class = pynetdicom.association.uid_to_service_class


def _uid_to_service_class(uid: str) -> type:
    if uid in PATIENT_ROOT or uid in STUDY_ROOT:
        return _RetrieveService
    return _original_uid_to_service_class(uid)


def _install_service_class() -> None:
    """Route the GET/MOVE SOP classes to `_RetrieveService` (pynetdicom picks a service class per SOP class
    in `Association._serve_request`; it has no per-AE setting for this)."""
    pynetdicom.association.uid_to_service_class = _uid_to_service_class


_PYNETDICOM_MOVE_DESTINATION: property = C_MOVE.MoveDestination  # type: ignore[assignment]


def _set_move_destination(primitive: C_MOVE, value: str | bytes | None) -> None:
    """pynetdicom's setter, except that a value that is no AE title (`movescu -aem ""` sends a zero-length
    one) is kept as received: pynetdicom's setter raises while the request is decoded, and its DIMSE layer
    then aborts the association with a traceback in the log. Kept, it reaches `_destination`, which answers
    0xA801 (Refused: Move Destination unknown), the status PS3.4 defines for it."""
    if isinstance(value, str):
        try:
            check_ae_title(value, "Move Destination")
        except AeError:
            primitive._move_destination = value
            return
    _PYNETDICOM_MOVE_DESTINATION.fset(primitive, value)  # type: ignore[misc]


_LENIENT_MOVE_DESTINATION = property(_PYNETDICOM_MOVE_DESTINATION.fget, _set_move_destination)


# ---------------------------------------------------------------------------------------------------------
# Responses


def _response(
    kind: type,
    req: C_GET | C_MOVE,
    status: int,
    counts: SendCounts | None = None,
    *,
    comment: str | None = None,
    identifier: bytes | None = None,
) -> C_GET | C_MOVE:
    rsp = kind()
    rsp.MessageIDBeingRespondedTo = req.MessageID
    rsp.AffectedSOPClassUID = req.AffectedSOPClassUID
    rsp.Status = status
    if counts is not None:
        if status in (PENDING, CANCEL):
            rsp.NumberOfRemainingSuboperations = counts.remaining
        rsp.NumberOfCompletedSuboperations = counts.completed
        rsp.NumberOfFailedSuboperations = counts.failed
        rsp.NumberOfWarningSuboperations = counts.warning
    if comment and status not in (SUCCESS, PENDING, CANCEL, WARNING):  # PS3.7 C.4.2: failures carry one
        rsp.ErrorComment = error_comment(comment)
    if identifier is not None:
        rsp.Identifier = BytesIO(identifier)
    return rsp


def final_status(counts: SendCounts) -> int:
    """PS3.4 C.4.2.3.1: success when every sub-operation completed, failure when all failed, else warning."""
    if counts.cancelled:
        return CANCEL
    if counts.failed == 0 and counts.warning == 0:
        return SUCCESS
    if counts.completed == 0 and counts.warning == 0:
        return UNABLE_TO_PERFORM
    return WARNING


def _failed_list(event: evt.Event, counts: SendCounts) -> bytes:
    """The response Identifier with Failed SOP Instance UID List (0008,0058), in the request's syntax."""
    ds = Dataset()
    ds.FailedSOPInstanceUIDList = counts.failed_uids
    ts = event.context.transfer_syntax
    return encode(ds, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)


# ---------------------------------------------------------------------------------------------------------
# What a request names


@dataclass(frozen=True, slots=True)
class Scope:
    """What a request asks for: the studies (or the patients) with, below them, series and instance UIDs."""

    level: str
    patients: tuple[str, ...] = ()
    studies: tuple[str, ...] = ()
    series: tuple[str, ...] = ()
    instances: tuple[str, ...] = ()


def _values(identifier: Dataset, keyword: str) -> tuple[str, ...]:
    """A unique key's values: a list of UIDs (backslash-separated on the wire), duplicates removed."""
    value = identifier.get(keyword)
    if value is None or value == "":
        return ()
    items = [value] if isinstance(value, str) else list(value)
    return tuple(dict.fromkeys(str(v).strip() for v in items if str(v).strip()))


def parse_scope(identifier: Dataset, sop_class: str) -> Scope:
    """The Query/Retrieve Level and unique keys (PS3.4 C.4.2.2.1): the retrieve level's key, a list allowed,
    and one value of each key above it (Study Instance UID, Series Instance UID; Patient ID is not needed
    below PATIENT since UIDs are unique), each a valid UID. Raises RetrieveError 0xA900."""
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    allowed = (
        ("PATIENT", "STUDY", "SERIES", "IMAGE") if sop_class in PATIENT_ROOT else ("STUDY", "SERIES", "IMAGE")
    )
    if level not in allowed:
        raise RetrieveError(
            IDENTIFIER_MISMATCH, f"Query/Retrieve Level {level or 'missing'} not in {allowed}"
        )
    keys = {keyword: _values(identifier, keyword) for keyword in _LEVEL_KEY.values()}
    if not keys[_LEVEL_KEY[level]]:
        raise RetrieveError(IDENTIFIER_MISMATCH, f"{_LEVEL_KEY[level]} is required at {level} level")
    above = list(_LEVEL_KEY)[1 : list(_LEVEL_KEY).index(level)]  # the UID keys above the level
    for upper in above:
        if len(keys[_LEVEL_KEY[upper]]) != 1:
            raise RetrieveError(IDENTIFIER_MISMATCH, f"one {_LEVEL_KEY[upper]} is required at {level} level")
    for used in (*above, level):
        keyword = _LEVEL_KEY[used]
        if keyword != "PatientID" and (bad := next((v for v in keys[keyword] if not is_valid_uid(v)), None)):
            # a wildcard or other non-UID would match nothing and answer success: the identifier's fault
            raise RetrieveError(IDENTIFIER_MISMATCH, f"{keyword} {bad!r} is not a UID")
    return Scope(
        level,
        patients=keys["PatientID"] if level == "PATIENT" else (),
        studies=keys["StudyInstanceUID"] if level != "PATIENT" else (),
        series=keys["SeriesInstanceUID"] if level in ("SERIES", "IMAGE") else (),
        instances=keys["SOPInstanceUID"] if level == "IMAGE" else (),
    )


async def find_scope(gateway: Gateway, partition: str, scope: Scope) -> list[StoredInstance]:
    """The stored instances a scope names, in the index's order: one index read per study, or one for the
    series (or instances) of one study; UIDs the partition does not hold are simply not found."""
    key = await gateway.partition_key(partition)
    if key is None:  # a partition nothing was ever stored into
        return []
    pool = gateway.pool
    if scope.level == "PATIENT":
        studies: tuple[str, ...] = tuple(await find_patient_studies(pool, key, list(scope.patients)))
    else:
        studies = scope.studies
    if scope.level in ("PATIENT", "STUDY"):
        return [instance for study in studies for instance in await find_instances(pool, key, study)]
    (study,) = studies
    if scope.level == "SERIES":
        if len(scope.series) == 1:
            return await find_instances(pool, key, study, scope.series[0])
        wanted = set(scope.series)
        return [i for i in await find_instances(pool, key, study) if i.series_instance_uid in wanted]
    (series,) = scope.series
    if len(scope.instances) == 1:
        return await find_instances(pool, key, study, series, scope.instances[0])
    wanted = set(scope.instances)
    return [i for i in await find_instances(pool, key, study, series) if i.sop_instance_uid in wanted]


# ---------------------------------------------------------------------------------------------------------
# The handlers


def _on_get(event: evt.Event, gateway: Gateway) -> None:
    _retrieve(event, gateway, C_GET, "C-GET")


def _on_move(event: evt.Event, gateway: Gateway) -> None:
    _retrieve(event, gateway, C_MOVE, "C-MOVE")


def _retrieve(event: evt.Event, gateway: Gateway, kind: type, operation: str) -> None:
    started = time.perf_counter()
    peer: Peer = event.assoc.archive_peer
    request = event.request
    respond: Callable[[Any], None] = event.respond
    destination = str(request.MoveDestination or "").strip() if kind is C_MOVE else None
    study: str | None = None
    counts: SendCounts | None = None
    comment: str | None = None
    try:
        if not peer.may(Service.RETRIEVE):
            raise RetrieveError(NOT_AUTHORIZED, f"AE {peer.ae.ae_title} may not retrieve")
        try:
            identifier = event.identifier
        except Exception as exc:
            raise RetrieveError(UNABLE_TO_PROCESS, f"identifier cannot be decoded: {exc}") from exc
        scope = parse_scope(identifier, str(event.context.abstract_syntax))
        study = scope.studies[0] if len(scope.studies) == 1 else None
        address = _destination(gateway, destination) if destination is not None else None
        try:
            instances = gateway.run(find_scope(gateway, peer.ae.partition, scope))
        except Exception as exc:
            raise RetrieveError(UNABLE_TO_CALCULATE, f"index unavailable: {exc.__class__.__name__}") from exc
        if len(instances) > MAX_SUBOPERATIONS:
            raise RetrieveError(
                UNABLE_TO_CALCULATE,
                f"{len(instances)} instances: more than {MAX_SUBOPERATIONS}, retrieve less",
            )
        counts = _send(event, gateway, peer, kind, instances, destination, address)
        status = final_status(counts)
        comment = counts.first_error
        failures = _failed_list(event, counts) if status != SUCCESS else None
        respond(_response(kind, request, status, counts, comment=comment, identifier=failures))
    except RetrieveError as exc:
        status, comment = exc.status, str(exc)
        respond(_response(kind, request, status, counts, comment=comment))
    detail = f"{operation} to {destination}" if destination is not None else operation
    if counts is not None:
        detail += (
            f": {counts.completed} completed, {counts.failed} failed, {counts.warning} warning, "
            f"{counts.remaining} remaining"
        )
    if comment:
        detail += f"; {comment}"
    gateway.audit(
        subject=peer.subject, address=peer.address, operation=operation, action_code="R", status=status,
        failed=status not in (SUCCESS, CANCEL), started=started, partition=peer.ae.partition,
        detail=detail, study=study,
    )  # fmt: skip


def _destination(gateway: Gateway, title: str) -> tuple[str, int]:
    """Where a Move Destination is: a registered AE with an address to connect to, else 0xA801."""
    try:
        check_ae_title(title, "Move Destination")
    except AeError as exc:
        raise RetrieveError(DESTINATION_UNKNOWN, str(exc)) from exc
    try:
        registered = gateway.run(get_ae(gateway.pool, title), timeout=30)
    except Exception as exc:
        raise RetrieveError(UNABLE_TO_PROCESS, f"AE registry unavailable: {exc.__class__.__name__}") from exc
    if registered is None:
        raise RetrieveError(DESTINATION_UNKNOWN, f"Move Destination {title} is not a registered AE")
    try:
        return registered.address()
    except AeError as exc:
        raise RetrieveError(DESTINATION_UNKNOWN, str(exc)) from exc


def _send(
    event: evt.Event,
    gateway: Gateway,
    peer: Peer,
    kind: type,
    instances: list[StoredInstance],
    destination: str | None,
    address: tuple[str, int] | None,
) -> SendCounts:
    """The C-STORE sub-operations over the peer's own association for C-GET, over a new one to the
    destination for C-MOVE (whose refusal fails every sub-operation: 0xA702).

    Pending responses are optional (PS3.4 C.4.2.3.1, C.4.3.3.1): one after the first sub-operation, then at
    most one per `gateway.pending_interval`, which is progress enough for any display and spares each
    sub-operation a message of its own (a sixth of the association thread's time at 300 a second)."""
    request, respond = event.request, event.respond
    message_id = int(request.MessageID)
    last_pending: float | None = None

    def progress(counts: SendCounts) -> None:
        nonlocal last_pending
        now = time.monotonic()
        if last_pending is not None and now - last_pending < gateway.pending_interval:
            return
        if counts.remaining and event.assoc.is_established:
            respond(_response(kind, request, PENDING, counts))
            last_pending = now

    def cancelled() -> bool:
        return bool(event.is_cancelled)

    if not instances:
        return SendCounts(remaining=0)
    if destination is None:
        return send_instances(event.assoc, gateway, instances, cancelled=cancelled, progress=progress)
    assert address is not None
    store_assoc = associate(gateway, address[0], address[1], destination, instances)
    if not store_assoc.is_established:
        counts = SendCounts(remaining=len(instances))
        why = "rejected" if store_assoc.is_rejected else "aborted" if store_assoc.is_aborted else "failed"
        for instance in instances:
            counts.fail(instance, "")
        counts.first_error = f"association with {destination} at {address[0]}:{address[1]} {why}"
        return counts
    try:
        return send_instances(
            store_assoc, gateway, instances, cancelled=cancelled, progress=progress,
            originator=(peer.ae.ae_title, message_id),
        )  # fmt: skip
    finally:
        if store_assoc.is_established:
            store_assoc.release()
