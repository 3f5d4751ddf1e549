"""Imaging orders (ORM^O01, OMI^O23) as UPS work items: a new order is a SCHEDULED work item, a cancel its
cancellation, through the worklist's own create and cancel (worklist/store.py), so an order placed in the
HIS is in UPS-RS and in the DIMSE Modality Worklist (dimse/mwl_map.py reads the same attributes).

One work item per Scheduled Procedure Step: each IPC segment of an order (OMI, IHE RAD-4 in v2.5), or each
ORC/OBR pair without one (ORM). The work item's UID is derived from the placer order number and the step,
so an order sent twice (a retransmission after a lost ACK) finds its work item instead of making another.
The field mapping is IHE Scheduled Workflow's (RAD TF-2 Table B-1), written out in docs/hl7.md.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from hl7.handling import Outcome, Target
from hl7.message import (
    AE,
    APPLICATION_INTERNAL_ERROR,
    DATA_TYPE_ERROR,
    REQUIRED_FIELD_MISSING,
    SEGMENT_SEQUENCE_ERROR,
    TABLE_VALUE_NOT_FOUND,
    UNKNOWN_KEY_IDENTIFIER,
    HL7Error,
    Received,
    Segment,
    segments,
    value,
)
from hl7.values import LOCAL_SCHEME, code, element, identifiers, patient_attributes, timestamp
from worklist import store
from worklist.search import Search, parse_filter, search
from worklist.validate import DatasetError, check_dataset, first, prepare_create, values

NEW = frozenset({"NW"})
CANCEL = frozenset({"CA", "OC", "DC"})  # cancel request, order canceled, order discontinued

# UIDs of work items and studies made from orders: 2.25 + a name-based UUID (PS3.5 B.2)
_NAMESPACE = uuid.UUID("0b3c8d4e-6a55-4f0e-9a7c-4c1e5d7f2b10")

# HL7 priorities (TQ1-9, TQ-6 of ORC-7 / OBR-27; table 0485) -> UPS Scheduled Procedure Step Priority
_PRIORITY = {"S": "HIGH", "A": "HIGH", "P": "HIGH", "C": "HIGH", "R": "MEDIUM", "T": "MEDIUM"}

_RRS, _PLACER = "0040A370", "00402016"
_STATE = "00741000"


@dataclass
class Order:
    """One ORC with the segments that detail it (OBR, TQ1, IPC, ZDS)."""

    orc: Segment
    index: int  # its place among the message's ORC groups, from 1
    details: dict[str, list[Segment]] = field(default_factory=dict)

    def first(self, name: str) -> Segment | None:
        found = self.details.get(name)
        return found[0] if found else None


def orders_of(received: Received) -> list[Order]:
    """The ORC groups of a message, in order."""
    out: list[Order] = []
    for segment in received.segments:
        name = segment.name
        if name == "ORC":
            out.append(Order(segment, len(out) + 1))
        elif out and name in ("OBR", "TQ1", "IPC", "ZDS"):
            out[-1].details.setdefault(name, []).append(segment)
    if not out:
        raise HL7Error(
            AE, SEGMENT_SEQUENCE_ERROR, f"{received.header.message_type} has no ORC segment", "ORC"
        )
    return out


def _uid(*parts: str) -> str:
    return f"2.25.{uuid.uuid5(_NAMESPACE, chr(31).join(parts)).int}"


def _placer(order: Order) -> tuple[str, str]:
    """(placer order number, its namespace): ORC-2, else OBR-2 (EI-1, EI-2)."""
    for segment, number in ((order.orc, 2), (order.first("OBR"), 2)):
        if segment is not None and value(segment, number):
            namespace = value(segment, number, component=2)
            return value(segment, number), namespace
    raise HL7Error(AE, REQUIRED_FIELD_MISSING, "ORC-2 and OBR-2 (placer order number) are empty", "ORC^1^2")


def _scope(namespace: str, received: Received) -> str:
    """The namespace of a placer order number: its own, else the sender's application and facility."""
    return namespace or f"{received.header.sending_application}@{received.header.sending_facility}"


def _start(order: Order, received: Received) -> str:
    """Scheduled start: TQ1-7, ORC-7.4, OBR-27.4, OBR-36, OBR-6, else the order's own time (ORC-9, MSH-7),
    so an order without a time is on the day it was placed."""
    tq1, obr = order.first("TQ1"), order.first("OBR")
    candidates = [(tq1, 7, 1), (order.orc, 7, 4), (obr, 27, 4), (obr, 36, 1), (obr, 6, 1), (order.orc, 9, 1)]
    for segment, number, component in candidates:
        if segment is not None:
            found = timestamp(segment, number, component)
            if found:
                return found
    found = timestamp(segments(received, "MSH")[0], 7)
    if found:
        return found
    raise HL7Error(
        AE, REQUIRED_FIELD_MISSING, "the order has no date/time (TQ1-7, ORC-7.4, OBR-36, MSH-7)", "ORC^1^7"
    )


def _priority(order: Order) -> str:
    tq1, obr = order.first("TQ1"), order.first("OBR")
    for segment, number, component in ((tq1, 9, 1), (order.orc, 7, 6), (obr, 27, 6), (obr, 5, 1)):
        if segment is not None and value(segment, number, component=component):
            return _PRIORITY.get(value(segment, number, component=component).upper(), "MEDIUM")
    return "MEDIUM"


def _code_seq(item: dict[str, Any] | None) -> dict[str, Any]:
    return {"vr": "SQ", "Value": [item]} if item else {"vr": "SQ"}


def _local_code(
    segment: Segment | None, field_number: int, *, scheme: str = LOCAL_SCHEME, meaning: str = ""
) -> dict[str, Any] | None:
    """A code item whose value is a field's first component (a station's AE title, a modality, a room)."""
    text = value(segment, field_number)
    if segment is None or not text:
        return None
    return {
        "00080100": element("SH", text, segment, field_number),
        "00080102": {"vr": "SH", "Value": [scheme]},
        "00080104": {"vr": "LO", "Value": [(meaning or text)[:64]]},
    }


def _at(*places: tuple[Segment | None, int]) -> tuple[Segment, int]:
    """The first of these (segment, field) places that holds a value; the first that exists when none
    does (its value is then empty)."""
    present = [(segment, number) for segment, number in places if segment is not None]
    return next(((s, n) for s, n in present if value(s, n)), present[0])


def _set(ds: dict[str, Any], key: str, elem: dict[str, Any] | None) -> None:
    if elem is not None:
        ds[key] = elem


def _workitem(received: Received, order: Order, ipc: Segment | None, step: str) -> tuple[str, dict]:
    """(work item UID, its data set) for one Scheduled Procedure Step of an order; `step` is its place in
    the message (ORC group and IPC), the step's identity when neither IPC-4 nor OBR-20 names it."""
    pid = segments(received, "PID")
    if not pid:
        raise HL7Error(
            AE, SEGMENT_SEQUENCE_ERROR, f"{received.header.message_type} has no PID segment", "PID"
        )
    patient = pid[0]
    ids = identifiers(patient, 3)
    if not ids:
        raise HL7Error(
            AE, REQUIRED_FIELD_MISSING, "PID-3 (patient identifier list) has no identifier", "PID^1^3"
        )
    pv1s = segments(received, "PV1")
    pv1 = pv1s[0] if pv1s else None
    obr = order.first("OBR")
    if obr is None:
        raise HL7Error(AE, SEGMENT_SEQUENCE_ERROR, "an ORC of a new order has no OBR segment", "OBR")
    number, namespace = _placer(order)
    scope = _scope(namespace, received)
    # (segment, field) each value comes from, so a refusal names the field the value was taken from
    placer_at = _at((order.orc, 2), (obr, 2))
    filler_at = _at((order.orc, 3), (obr, 3))
    accession_at = _at((ipc, 1), (obr, 18), filler_at, placer_at)
    requested_at = _at((ipc, 2), (obr, 19), accession_at)
    filler, accession, requested_id = value(*filler_at), value(*accession_at), value(*requested_at)
    own_sps_id = value(ipc, 4) or value(obr, 20)
    sps_id = own_sps_id or step
    uid = _uid(scope, number, requested_id, sps_id)
    study_uid = value(ipc, 3) or value(order.first("ZDS"), 1) or _uid(scope, number, requested_id, "study")
    procedure = code(obr, 44) or code(obr, 4)
    protocol = (code(ipc, 6) if ipc is not None else None) or code(obr, 4)
    description = value(obr, 44, component=2) or value(obr, 4, component=2) or value(obr, 4)
    label = (value(obr, 4, component=2) or value(obr, 4) or description or f"order {number}")[:64]
    station_at = (ipc, 9) if value(ipc, 9) else (order.orc, 18)
    modality_at = (ipc, 5) if value(ipc, 5) else (obr, 24)
    location_at = (ipc, 8) if value(ipc, 8) else (pv1, 3)
    station_name = value(ipc, 7) or value(*station_at)
    request: dict[str, Any] = {
        "0020000D": {"vr": "UI", "Value": [study_uid]},
        "00080050": element("SH", accession, *accession_at) or {"vr": "SH"},
        "00401001": element("SH", requested_id, *requested_at) or {"vr": "SH"},
        "00321060": {"vr": "LO", "Value": [description[:64]]} if description else {"vr": "LO"},
        "00321064": _code_seq(procedure),
        _PLACER: element("LO", number, *placer_at),
    }
    _set(request, "00402017", element("LO", filler, *filler_at))  # Filler Order Number / IS Request
    reason = value(obr, 31, component=2) or value(obr, 31)
    if reason:
        request["00401002"] = {"vr": "LO", "Value": [reason[:64]]}
    # Order Placer Identifier Sequence > Local Namespace Entity ID: the placer's namespace, or the sender
    # when the placer gave none (a cancel finds the order's work items by number and this)
    request["00400026"] = {"vr": "SQ", "Value": [{"00400031": {"vr": "UT", "Value": [scope]}}]}
    stations = _local_code(*station_at, meaning=station_name)
    modality_code = _local_code(*modality_at, scheme="DCM")
    location = value(*location_at)
    location_code = _local_code(*location_at) if len(location) <= 16 else None  # a code value is SH

    ds: dict[str, Any] = {
        _STATE: {"vr": "CS", "Value": ["SCHEDULED"]},
        "00741200": {"vr": "CS", "Value": [_priority(order)]},
        "00741204": {"vr": "LO", "Value": [label]},
        "00404005": {"vr": "DT", "Value": [_start(order, received)]},
        "00404041": {"vr": "CS", "Value": ["READY"]},
        "00404025": _code_seq(stations),
        "00404026": _code_seq(modality_code),
        "00404027": _code_seq(location_code),
        "00404018": _code_seq(protocol),
        "00400400": {"vr": "LT"},
        "00404021": {"vr": "SQ"},
        "00100020": element("LO", ids[0].id, patient, 3),
        "00100021": element("LO", ids[0].issuer, patient, 3) or {"vr": "LO"},
        "00100024": {"vr": "SQ"},
        "00100010": {"vr": "PN"},
        "00100030": {"vr": "DA"},
        "00100040": {"vr": "CS"},
        "00380010": {"vr": "LO"},
        "00380014": {"vr": "SQ"},
        "00081080": {"vr": "LO"},
        "00081084": {"vr": "SQ"},
        _RRS: {"vr": "SQ", "Value": [request]},
        "00741216": {"vr": "SQ"},
    }
    ds.update(patient_attributes(patient))
    if pv1 is not None:
        _set(ds, "00380010", element("LO", value(pv1, 19), pv1, 19))  # Admission ID: the visit number
    if own_sps_id and len(own_sps_id) <= 16:  # VR SH
        # not a UPS attribute: kept so the Modality Worklist answers the order's own SPS ID (dimse.mwl_map)
        ds["00400009"] = {"vr": "SH", "Value": [own_sps_id]}
    return uid, ds


async def new_order(
    conn: asyncpg.Connection, received: Received, partition_key: int, order: Order, outcome: Outcome
) -> None:
    steps = order.details.get("IPC") or [None]
    for n, ipc in enumerate(steps, start=1):
        uid, ds = _workitem(received, order, ipc, f"{order.index}.{n}")
        try:
            _, attrs, _ = prepare_create(check_dataset(ds), uid)
        except DatasetError as exc:
            raise HL7Error(
                AE, DATA_TYPE_ERROR, f"the order makes an invalid work item: {exc}", "OBR"
            ) from exc
        try:
            async with conn.transaction():  # a savepoint: a duplicate leaves the rest of the message intact
                await store.create_in(conn, partition_key, uid, attrs)
        except store.UpsError as exc:
            if exc.status != 409:
                raise HL7Error(AE, APPLICATION_INTERNAL_ERROR, f"work item {uid}: {exc.message}") from exc
            outcome.result.setdefault("existing", []).append(uid)  # sent before: its work item is there
            continue
        outcome.result.setdefault("created", []).append(uid)


async def _order_items(conn: asyncpg.Connection, partition_key: int, number: str, scope: str) -> list[dict]:
    """The work items made from this placer order (any state)."""
    # the worklist search narrows to the placer number (a number with wildcard or list characters selects
    # more); each candidate is then compared exactly, with its namespace
    query = Search(filters=[parse_filter(f"ReferencedRequestSequence.{_PLACER}", number)], limit=1000)
    items = []
    for body in (await search(conn, partition_key, query)).results:
        item = orjson.loads(body)
        request = (values(item, _RRS) or [{}])[0]
        placers = values(request, "00400026")
        namespace = first(placers[0], "00400031") if placers else None
        if first(request, _PLACER) == number and namespace == scope:
            items.append(item)
    return items


async def cancel_order(
    conn: asyncpg.Connection, received: Received, partition_key: int | None, order: Order, outcome: Outcome
) -> None:
    number, namespace = _placer(order)
    scope = _scope(namespace, received)
    items = await _order_items(conn, partition_key, number, scope) if partition_key is not None else []
    assert partition_key is not None or not items
    if not items:
        raise HL7Error(AE, UNKNOWN_KEY_IDENTIFIER, f"no work item was made from order {number}", "ORC^1^2")
    reason = (
        value(order.orc, 16, component=2) or value(order.orc, 16) or f"order {value(order.orc, 1)} from HL7"
    )
    info = {"00741238": {"vr": "LT", "Value": [reason]}}  # Reason For Cancellation
    done = [str(first(i, "00080018")) for i in items if first(i, _STATE) == "COMPLETED"]
    if len(done) == len(items):
        raise HL7Error(
            AE,
            APPLICATION_INTERNAL_ERROR,
            f"the work items of order {number} are COMPLETED and cannot be canceled",
            "ORC^1^1",
        )
    for item in items:
        uid = str(first(item, "00080018"))
        if uid in done:
            continue
        try:
            already = await store.cancel_in(conn, partition_key, uid, info)
        except store.UpsError as exc:
            raise HL7Error(AE, APPLICATION_INTERNAL_ERROR, f"work item {uid}: {exc.message}") from exc
        outcome.result.setdefault("alreadyCanceled" if already else "canceled", []).append(uid)


async def place_orders(conn: asyncpg.Connection, received: Received, target: Target) -> Outcome:
    """Every ORC group of an ORM^O01 / OMI^O23: NW creates work items, CA / OC / DC cancels them."""
    outcome = Outcome()
    for order in orders_of(received):
        control = value(order.orc, 1).upper()
        if control in NEW:
            await new_order(conn, received, await target.ensure(), order, outcome)
        elif control in CANCEL:
            await cancel_order(conn, received, target.key, order, outcome)
        else:
            reason = f"order control {control or '(empty)'} (ORC-1) is not NW, CA, OC or DC"
            raise HL7Error(AE, TABLE_VALUE_NOT_FOUND, reason, "ORC^1^1")
    outcome.detail = "; ".join(
        f"{what}: {len(outcome.result[key])}" for key, what in _SAID.items() if outcome.result.get(key)
    )
    return outcome


# the result lists of an order message, as its ACK says them
_SAID = {
    "created": "work items created",
    "existing": "already scheduled (sent before)",
    "canceled": "work items canceled",
    "alreadyCanceled": "already canceled",
}
