"""C-ECHO and C-STORE SCP: a received object goes through the same ingest as a STOW-RS part.

Every storage SOP class is accepted, private ones included, in the transfer syntax the peer proposes first
(pynetdicom's unrestricted storage service): the archive stores objects as sent and reads every transfer
syntax it can parse. A success status is sent only once the object is durable and its index row (with its
change feed entry) has committed; a refusal leaves nothing stored, so an association that ends in any way
keeps exactly the instances that got a success status.
"""

from __future__ import annotations

import time
from typing import Any, BinaryIO

from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification

from archive.ingest import FailureReason, Ingestor, StoreOutcome
from dimse.aes import Service
from dimse.gateway import Gateway, Peer

_config.UNRESTRICTED_STORAGE_SERVICE = True

# C-STORE statuses (PS3.4 Table GG.4-1, PS3.7 Annex C)
SUCCESS = 0x0000
NOT_AUTHORIZED = 0x0124  # Refused: not authorized (the AE was not registered for store)
DUPLICATE = 0x0111  # Failure: duplicate SOP instance (as STOW refuses it with 45070)
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900  # Error: data set does not match SOP class
CANNOT_UNDERSTAND = 0xC000


def register(ae: AE, gateway: Gateway) -> list[tuple[Any, ...]]:
    ae.add_supported_context(Verification)
    return [(evt.EVT_C_ECHO, _on_echo, [gateway]), (evt.EVT_C_STORE, _on_store, [gateway])]


def peer_of(event: evt.Event) -> Peer:
    return event.assoc.archive_peer  # set when the association was accepted (dimse/server.py)


def _on_echo(event: evt.Event, gateway: Gateway) -> int:
    peer = peer_of(event)
    gateway.audit(subject=peer.subject, address=peer.address, operation="C-ECHO", action_code="E",
                  status=SUCCESS, failed=False, started=time.perf_counter())  # fmt: skip
    return SUCCESS


def status_of(outcome: StoreOutcome) -> int:
    """The C-STORE status of an ingest outcome."""
    if outcome.failure is None:
        return SUCCESS
    if outcome.failure is FailureReason.ALREADY_STORED:
        return DUPLICATE
    if outcome.sop_mismatch:
        return DOES_NOT_MATCH
    if outcome.failure is FailureReason.INVALID_INSTANCE:
        # unparseable objects; UID or index conflicts of a parsed one are a mismatch with the SOP class rules
        return DOES_NOT_MATCH if outcome.sop_class_uid else CANNOT_UNDERSTAND
    return OUT_OF_RESOURCES  # storage or database failures: the peer may try again later


def response(status: int, comment: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = status
    if comment:
        ds.ErrorComment = comment.encode("ascii", "replace").decode("ascii")[:64]
    return ds


async def store_file(gateway: Gateway, peer: Peer, fp: BinaryIO, expect: tuple[str, str]) -> StoreOutcome:
    """Ingest one received object (a PS3.10 file, closed by the ingestor) into the peer's partition."""
    try:
        ingestor = Ingestor(gateway.pool, gateway.store, await gateway.partition_key(peer.ae.partition))
    except BaseException:
        fp.close()
        raise
    await ingestor.add(fp, expect=expect)
    (outcome,) = await ingestor.finish()
    return outcome


def _on_store(event: evt.Event, gateway: Gateway) -> Dataset:
    started = time.perf_counter()
    peer = peer_of(event)
    request = event.request
    expect = (str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID))
    if not peer.may(Service.STORE):
        status, outcome = NOT_AUTHORIZED, StoreOutcome(message=f"AE {peer.ae.ae_title} may not store")
    else:
        try:
            fp = open(event.dataset_path, "rb")  # the ingestor closes it
            outcome = gateway.run(store_file(gateway, peer, fp, expect))
            status = status_of(outcome)
        except Exception as exc:  # never leaves the association hanging: the peer gets a failure status
            status, outcome = OUT_OF_RESOURCES, StoreOutcome(message=f"{exc.__class__.__name__}: {exc}")
    gateway.audit(
        subject=peer.subject, address=peer.address, operation="C-STORE", action_code="C", status=status,
        failed=status != SUCCESS, started=started, partition=peer.ae.partition,
        detail=outcome.message or None,
        study=outcome.study_instance_uid, series=outcome.series_instance_uid, instance=expect[1],
    )  # fmt: skip
    return response(status, outcome.message if status != SUCCESS else None)
