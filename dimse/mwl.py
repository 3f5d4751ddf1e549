"""Modality Worklist C-FIND SCP (PS3.4 Annex K) answered from the UPS-RS worklist (IHE Scheduled Workflow).

A modality asking for its worklist gets the SCHEDULED work items of its AE's partition: dimse.mwl_map
turns the identifier into the worklist search's filters (worklist/search.py: the same SQL as
`GET /workitems`) and each work item into a pending response. Pages of `gateway.find_page_size` items are
read one at a time on the event loop; C-CANCEL is honoured between responses. pynetdicom takes one
EVT_C_FIND handler per AE, so this module registers its generator in dimse.find.FIND_MODELS.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import orjson
from pydicom.dataset import Dataset
from pynetdicom import AE, evt

from dimse import find
from dimse.aes import Service
from dimse.gateway import Gateway, Peer
from dimse.mwl_map import Query, QueryError, answer, parse_identifier, sps_id_matches, time_of_day_matches
from dimse.storescp import peer_of, response
from worklist.search import Search, search

MODALITY_WORKLIST_FIND = "1.2.840.10008.5.1.4.31"  # Modality Worklist Information Model - FIND
IDENTIFIER_DOES_NOT_MATCH = 0xA900
OUT_OF_RESOURCES = 0xA700
UNABLE_TO_PROCESS = 0xC000


class _UndecodableIdentifier(Exception):
    """The identifier's bytes do not decode: the peer's fault (0xC000), not the archive's resources."""


def _decoded_identifier(event: evt.Event) -> Dataset:
    """The request's identifier with every element decoded now: pydicom decodes elements lazily, so a
    malformed one (a sequence sent as an LO value) would otherwise raise in the middle of the search."""
    try:
        identifier = event.identifier
        identifier.walk(lambda _ds, _elem: None)
    except Exception as exc:
        raise _UndecodableIdentifier(f"identifier cannot be decoded: {exc}") from exc
    return identifier


def register(ae: AE, gateway: Gateway) -> list[tuple[Any, ...]]:
    ae.add_supported_context(MODALITY_WORKLIST_FIND, find.TRANSFER_SYNTAXES)
    find.FIND_MODELS[MODALITY_WORKLIST_FIND] = find_worklist
    return []  # dimse.find's one EVT_C_FIND handler dispatches to find_worklist


def find_worklist(event: evt.Event, gateway: Gateway) -> Iterator[tuple[Any, Dataset | None]]:
    """A pending response per scheduled work item that matches, then the final status."""
    started = time.perf_counter()
    peer = peer_of(event)
    status, comment, matches = find.SUCCESS, None, 0
    try:
        if not peer.may(Service.WORKLIST):
            status, comment = find.NOT_AUTHORIZED, f"AE {peer.ae.ae_title} may not query the worklist"
        else:
            try:
                identifier = _decoded_identifier(event)
                query = parse_identifier(identifier)
                pending = find.PENDING_WARNING if query.unsupported else find.PENDING
                cancelled = False  # pynetdicom reports a C-CANCEL once
                for item in [] if query.impossible else _items(gateway, peer, query):
                    cancelled = cancelled or event.is_cancelled
                    if cancelled:
                        break
                    yield pending, answer(identifier, item)
                    matches += 1
                if cancelled or event.is_cancelled:
                    status = find.CANCELLED
            except QueryError as exc:
                status, comment = IDENTIFIER_DOES_NOT_MATCH, str(exc)
            except _UndecodableIdentifier as exc:
                status, comment = UNABLE_TO_PROCESS, str(exc)
            except Exception as exc:  # the peer always gets a final status, never a hung association
                status, comment = OUT_OF_RESOURCES, f"{exc.__class__.__name__}: {exc}"
        yield (response(status, comment) if comment else status), None
    finally:
        detail = f"worklist: {matches} matches" + (f"; {comment}" if comment else "")
        gateway.audit(
            subject=peer.subject, address=peer.address, operation="C-FIND", action_code="R", status=status,
            failed=status not in (find.SUCCESS, find.CANCELLED), started=started, partition=peer.ae.partition,
            detail=detail,
        )  # fmt: skip


def _items(gateway: Gateway, peer: Peer, query: Query) -> Iterator[Dataset]:
    """The matching work items in the worklist's order (scheduled start), page by page."""
    key = gateway.run(gateway.partition_key(peer.ae.partition))
    if (
        key is None
    ):  # a partition nothing was ever stored into: its worklist is empty, a query creates nothing
        return
    page_size, offset = max(1, gateway.find_page_size), 0
    while True:
        page = gateway.run(search(gateway.pool, key, Search(list(query.filters), page_size, offset)))
        for body in page.results:
            item = Dataset.from_json(orjson.loads(body))
            if query.time_of_day is not None and not time_of_day_matches(item, query.time_of_day):
                continue
            if query.sps_ids is None or sps_id_matches(item, query.sps_ids):
                yield item
        if not page.more or not page.results:
            return
        offset += len(page.results)
