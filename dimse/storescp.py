"""C-ECHO and C-STORE SCP: a received object goes through the same ingest as a STOW-RS part.

Every storage SOP class is accepted, private ones included, in the transfer syntax the peer proposes first
(pynetdicom's unrestricted storage service): the archive stores objects as sent and reads every transfer
syntax it can parse. A success status is sent only once the object is durable and its index row (with its
change feed entry) has committed; a refusal leaves nothing stored, so an association that ends in any way
keeps exactly the instances that got a success status.
"""

from __future__ import annotations

import asyncio
import re
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
    queue = StoreQueue(gateway)
    return [(evt.EVT_C_ECHO, _on_echo, [gateway]), (evt.EVT_C_STORE, _on_store, [gateway, queue])]


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
    if outcome.does_not_match:
        return DOES_NOT_MATCH
    if outcome.failure is FailureReason.INVALID_INSTANCE:
        # unparseable objects; index conflicts of a parsed one (a series under another study) do not match
        return DOES_NOT_MATCH if outcome.sop_class_uid else CANNOT_UNDERSTAND
    return OUT_OF_RESOURCES  # storage or database failures: the peer may try again later


def error_comment(text: str) -> str:
    """An Error Comment (0000,0902) value: LO, VM 1, so ASCII of at most 64 characters without the value
    separator (a backslash quoted from a request's value split the comment, and peers kept the first part)."""
    return re.sub(r"\\+", "/", text.encode("ascii", "replace").decode("ascii"))[:64]  # repr() doubles them


def response(status: int, comment: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = status
    if comment:
        ds.ErrorComment = error_comment(comment)
    return ds


class StoreQueue:
    """Group commit for C-STOREs: objects arriving on several associations at once share index transactions.

    Each C-STORE waits for its own commit (its success status means durable and indexed), so one association
    sends one object per transaction. While a transaction of a partition runs, objects from the process's
    other associations queue, and the next transaction takes them all: with N associations, up to N objects
    per commit, with no added wait for a lone one.
    """

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._waiting: dict[int, list[tuple[BinaryIO, tuple[str, str], asyncio.Future[StoreOutcome]]]] = {}
        self._draining: set[int] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def store(self, partition: str, fp: BinaryIO, expect: tuple[str, str]) -> StoreOutcome:
        """Ingest one received object (a PS3.10 file, closed here) into a partition."""
        try:
            key = await self._gateway.partition_key(partition, create=True)
            assert key is not None
        except BaseException:
            fp.close()
            raise
        future: asyncio.Future[StoreOutcome] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append((fp, expect, future))
        if key not in self._draining:
            self._draining.add(key)
            task = asyncio.create_task(self._drain(key))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(future)  # a caller that gives up must not cancel the others' batch

    async def _drain(self, key: int) -> None:
        try:
            while batch := self._waiting.pop(key, None):
                try:
                    ingestor = Ingestor(self._gateway.pool, self._gateway.store, key)
                    for fp, expect, _ in batch:
                        await ingestor.add(fp, expect=expect)
                    outcomes = await ingestor.finish()
                except BaseException as exc:
                    for fp, _, future in batch:
                        fp.close()
                        if not future.done():
                            future.set_exception(
                                exc if isinstance(exc, Exception) else RuntimeError("stopped")
                            )
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_, _, future), outcome in zip(batch, outcomes, strict=True):
                    if not future.done():
                        future.set_result(outcome)
        finally:
            self._draining.discard(key)


def _on_store(event: evt.Event, gateway: Gateway, queue: StoreQueue) -> Dataset:
    started = time.perf_counter()
    peer = peer_of(event)
    request = event.request
    expect = (str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID))
    if not peer.may(Service.STORE):
        status, outcome = NOT_AUTHORIZED, StoreOutcome(message=f"AE {peer.ae.ae_title} may not store")
    else:
        try:
            fp = open(event.dataset_path, "rb")  # the queue closes it
            outcome = gateway.run(queue.store(peer.ae.partition, fp, expect))
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
