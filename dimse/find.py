"""C-FIND SCP, Patient Root and Study Root Query/Retrieve (PS3.4 Annex C), on the QIDO compiler.

A C-FIND and a QIDO-RS search are one search: dimse.identifiers turns the identifier into QIDO query pairs
and each DICOM JSON result back into a response identifier; indexer.qido matches, pages and builds the
results. Pages of `gateway.find_page_size` results are read one at a time on the event loop, so a huge
result never sits in memory; C-CANCEL is honoured between results. The PATIENT level is made of the
matching studies: their distinct (PatientID, IssuerOfPatientID), with the patient counters summed over them.

Contract with the other C-FIND services (Modality Worklist): pynetdicom takes a single EVT_C_FIND handler,
so this module binds the one handler, which dispatches on the request's Affected SOP Class UID through
`FIND_MODELS` (SOP class UID -> generator function(event, gateway) yielding (status, identifier) as a
pynetdicom C-FIND handler does). Another module adds its model from its own `register(ae, gateway)`:
`FIND_MODELS[UID] = handler`, adds its presentation context, and returns no EVT_C_FIND handler of its own.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, evt

from dicomcore.tags import tag_hex
from dimse.aes import Service
from dimse.gateway import Gateway, Peer
from dimse.identifiers import (
    IDENTIFIER_DOES_NOT_MATCH,
    ISSUER_OF_PATIENT_ID,
    PATIENT_COUNTERS,
    PATIENT_ID,
    PATIENT_INSTANCES,
    PATIENT_ROOT,
    PATIENT_SERIES,
    PATIENT_STUDIES,
    STUDY_INSTANCES,
    STUDY_ROOT,
    STUDY_SERIES,
    FindRequest,
    IdentifierError,
    read_identifier,
    response_identifier,
)
from dimse.pacing import ResponsiveDUL, wait_until_idle
from dimse.storescp import peer_of, response
from indexer.extended_tags import ExtendedTag, query_tags
from indexer.qido import QidoPage, QidoQuery, QueryError, parse_query, search_page

FindHandler = Callable[[evt.Event, Gateway], Iterator[tuple[Any, Dataset | None]]]

SUCCESS = 0x0000
PENDING = 0xFF00
PENDING_WARNING = 0xFF01  # an optional key was not supported for matching (dimse.identifiers)
CANCELLED = 0xFE00
NOT_AUTHORIZED = 0x0124
SOP_CLASS_NOT_SUPPORTED = 0x0122
UNABLE_TO_PROCESS = 0xC000

TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old peers)
]


def register(ae: AE, gateway: Gateway) -> list[tuple[Any, ...]]:
    for uid in (PATIENT_ROOT, STUDY_ROOT):
        ae.add_supported_context(uid, TRANSFER_SYNTAXES)
    return [(evt.EVT_C_FIND, on_find, [gateway])]


def on_find(event: evt.Event, gateway: Gateway) -> Iterator[tuple[Any, Dataset | None]]:
    """The one EVT_C_FIND handler: the model's handler from FIND_MODELS."""
    uid = str(event.request.AffectedSOPClassUID)
    handler = FIND_MODELS.get(uid)
    if handler is None:
        yield response(SOP_CLASS_NOT_SUPPORTED, f"C-FIND of {uid} is not supported"), None
        return
    for n, item in enumerate(handler(event, gateway), start=1):
        yield item
        if n % SEND_BATCH == 0:
            _wait_for_the_wire(event.assoc)


# Matches made between two waits for the wire: the DUL thread sends a batch while the next is made, and
# reads (a C-CANCEL) each time it has sent everything. Larger batches make a long answer faster but let the
# matches made before a C-CANCEL is read grow (16: ~300 for a peer cancelling after 100; 4: ~150, as 1).
SEND_BATCH = 4


def _wait_for_the_wire(assoc: Any) -> None:
    """Let the DUL thread send what is queued, and read what the peer sent, before the next batch of
    matches is made.

    pynetdicom's DUL reads from the peer only when it has nothing queued to send: matches produced faster
    than they go out would keep a C-CANCEL unread until the last one was sent (and hold every encoded
    response in memory when the peer reads slowly). Waiting here is the back-pressure. Every association
    of the listener is responsive (dimse/server.py), so its DUL says exactly when that is
    (dimse.pacing.wait_until_idle); a peer that reads slowly is waited for as long as the association
    lasts."""
    while not wait_until_idle(assoc, 1.0):
        if not assoc.is_established or not isinstance(assoc.dul, ResponsiveDUL):
            return


class _Cancel:
    """Whether a C-CANCEL came; pynetdicom reports it once, this remembers it."""

    def __init__(self, event: evt.Event) -> None:
        self.event = event
        self.seen = False

    def __call__(self) -> bool:
        self.seen = self.seen or self.event.is_cancelled
        return self.seen


def find(model: str, event: evt.Event, gateway: Gateway) -> Iterator[tuple[Any, Dataset | None]]:
    """C-FIND of the Patient or Study Root model: a pending response per match, then the final status."""
    started = time.perf_counter()
    peer = peer_of(event)
    status, comment, matches = SUCCESS, None, 0
    request: FindRequest | None = None
    cancelled = _Cancel(event)
    final = False  # pynetdicom closes the generator after the final status, or when the association ends
    try:
        if not peer.may(Service.FIND):
            status, comment = NOT_AUTHORIZED, f"AE {peer.ae.ae_title} may not query (C-FIND)"
        else:
            try:
                identifier = event.identifier
                partition_key, extended = gateway.run(_prepare(gateway, peer))
                request = read_identifier(model, identifier, extended)
                query = _query(gateway, request, extended)
                pending = PENDING_WARNING if request.unsupported else PENDING
                syntax = UID(event.context.transfer_syntax)
                implicit = (
                    syntax.is_implicit_VR if syntax.is_little_endian and not syntax.is_deflated else None
                )
                results: Iterator[dict] = iter(())
                if partition_key is None:
                    pass  # a partition nothing was ever stored into: no matches
                elif request.level == "PATIENT":
                    results = _patients(gateway, partition_key, query, request, cancelled)
                else:
                    results = _matches(gateway, partition_key, query)
                for result in results:
                    if cancelled():
                        break
                    yield pending, response_identifier(request, result, gateway.ae_title, implicit=implicit)
                    matches += 1
                if cancelled():
                    status = CANCELLED
            except IdentifierError as exc:
                status, comment = exc.status, str(exc)
                if exc.offending is not None:
                    final = True
                    yield _failure(status, comment, exc.offending), None
                    return
            except QueryError as exc:  # a key QIDO knows but refuses: the identifier's fault
                status, comment = IDENTIFIER_DOES_NOT_MATCH, str(exc)
                if re.fullmatch(r"[0-9A-F]{8}", exc.param):
                    final = True
                    yield _failure(status, comment, int(exc.param, 16)), None
                    return
            except Exception as exc:  # the peer always gets a final status, never a hung association
                status, comment = UNABLE_TO_PROCESS, f"{exc.__class__.__name__}: {exc}"
        final = True
        yield (response(status, comment) if comment else status), None
    finally:
        if not final:
            status, comment = UNABLE_TO_PROCESS, "the association ended before the last response"
        _audit(gateway, peer, request, status, comment, matches, started)


def _failure(status: int, comment: str, offending: int) -> Dataset:
    ds = response(status, comment)
    ds.OffendingElement = [offending]
    return ds


def _audit(
    gateway: Gateway, peer: Peer, request: FindRequest | None, status: int, comment: str | None,
    matches: int, started: float,
) -> None:  # fmt: skip
    detail = f"{request.level}: {matches} matches" if request is not None else None
    if comment:
        detail = f"{detail}; {comment}" if detail else comment
    gateway.audit(
        subject=peer.subject, address=peer.address, operation="C-FIND", action_code="R", status=status,
        failed=status not in (SUCCESS, CANCELLED), started=started, partition=peer.ae.partition,
        detail=detail, study=request.single_study if request is not None else None,
    )  # fmt: skip


async def _prepare(gateway: Gateway, peer: Peer) -> tuple[int | None, dict[int, ExtendedTag]]:
    """The peer's partition (None while it holds nothing) and the extended query tags (a few rows, read
    each time: other processes change them)."""
    key = await gateway.partition_key(peer.ae.partition)
    async with gateway.pool.acquire() as conn:
        return key, await query_tags(conn)


def _query(gateway: Gateway, request: FindRequest, extended: dict[int, ExtendedTag]) -> QidoQuery:
    page = max(1, gateway.find_page_size)
    return parse_query(
        request.qido_level, request.pairs, study_uid=request.study_uid, series_uid=request.series_uid,
        default_limit=page, max_limit=page, extended=extended,
    )  # fmt: skip


async def _page(gateway: Gateway, partition_key: int, query: QidoQuery) -> QidoPage:
    async with gateway.pool.acquire() as conn:
        return await search_page(conn, partition_key, query, "")  # no URLs over DIMSE


FIRST_PAGE = 50


def _pages(gateway: Gateway, partition_key: int, query: QidoQuery) -> Iterator[list[Any]]:
    """QIDO's pages in order (offset paging: results are ordered by creation, new data sorts last).

    Pages grow from FIRST_PAGE to the query's limit (doubling): the first responses go out after a small
    read, and a peer that cancels after a screenful has cost a small read, not a page of a thousand."""
    offset, limit = 0, min(FIRST_PAGE, query.limit)
    while True:
        page = gateway.run(
            _page(gateway, partition_key, dataclasses.replace(query, offset=offset, limit=limit))
        )
        yield page.results
        if not page.more:
            return
        offset += limit  # rows read, though QIDO drops a row deleted while its page was read
        limit = min(limit * 2, query.limit)


def _matches(gateway: Gateway, partition_key: int, query: QidoQuery) -> Iterator[dict]:
    for results in _pages(gateway, partition_key, query):
        yield from results


_PATIENT_KEY = (tag_hex(PATIENT_ID), tag_hex(ISSUER_OF_PATIENT_ID))


def _patients(
    gateway: Gateway, partition_key: int, query: QidoQuery, request: FindRequest, cancelled: _Cancel
) -> Iterator[dict]:
    """The distinct patients of the matching studies, in the order of their first study, with their
    counters. One small record per matching patient is held until the last page has been read (the
    counters need every study)."""
    counters = request.tags & PATIENT_COUNTERS
    if counters:
        query = dataclasses.replace(query, include=query.include | {STUDY_SERIES, STUDY_INSTANCES})
    patients: dict[tuple[str | None, ...], list[Any]] = {}
    for results in _pages(gateway, partition_key, query):
        if cancelled():
            return
        for study in results:
            key = tuple(_first(study, k) for k in _PATIENT_KEY)
            entry = patients.get(key)
            if entry is None:
                attrs = {k: v for k, v in study.items() if k.startswith("0010")}
                entry = patients[key] = [attrs, 0, 0, 0]
            entry[1] += 1
            entry[2] += _first(study, tag_hex(STUDY_SERIES)) or 0
            entry[3] += _first(study, tag_hex(STUDY_INSTANCES)) or 0
    for attrs, studies, series, instances in patients.values():
        for tag, value in (
            (PATIENT_STUDIES, studies),
            (PATIENT_SERIES, series),
            (PATIENT_INSTANCES, instances),
        ):
            if tag in counters:
                attrs[tag_hex(tag)] = {"vr": "IS", "Value": [value]}
        yield attrs


def _first(attrs: dict, key: str) -> Any:
    values = (attrs.get(key) or {}).get("Value") or [None]
    return values[0]


FIND_MODELS: dict[str, FindHandler] = {
    PATIENT_ROOT: functools.partial(find, PATIENT_ROOT),
    STUDY_ROOT: functools.partial(find, STUDY_ROOT),
}
