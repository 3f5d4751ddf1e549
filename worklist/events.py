"""UPS event reports (PS3.4 CC.2.4, PS3.18 11.13): built from committed changes only, through an outbox.

`emit` runs inside the transaction that changes the work item: it gives each subscriber the next numbers
of its own sequence (locking its ups_subscriber row, in AE title order so writers cannot deadlock, until
commit) and inserts the event rows. `pg_notify` at the end is delivered at commit only, so nothing is ever
announced for a change that rolls back. Readers (worklist.delivery) read "after sequence N" per subscriber.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from worklist.requirements import UPS_EVENT_SOP_CLASS

CHANNEL = "dicomweb_worklist"

# private attributes that carry the per-subscriber sequence in each report (our extension; see delivery)
PRIVATE_CREATOR_KEY = "00770010"
PRIVATE_CREATOR = "DICOMWEB ARCHIVE UPS"
SEQUENCE_KEY = "00771001"
# the gap notice (see gap_notice): first and last sequence dropped, and a sentence saying so
DROPPED_FIRST_KEY, DROPPED_LAST_KEY, DROPPED_TEXT_KEY = "00771002", "00771003", "00771004"

# SCP Status Change reports concern the SCP, not a work item: they name the well-known UPS Global
# Subscription instance as their Affected SOP Instance UID
GLOBAL_SUBSCRIPTION_UID = "1.2.840.10008.5.1.4.34.5"


class EventType(enum.IntEnum):
    """Event Type ID (0000,1002) of PS3.4 Table CC.2.4-1."""

    STATE_REPORT = 1
    CANCEL_REQUESTED = 2
    PROGRESS_REPORT = 3
    SCP_STATUS_CHANGE = 4
    ASSIGNED = 5


# event information of each type, taken from the work item (Table CC.2.4-1)
_INFO: dict[EventType, tuple[str, ...]] = {
    EventType.STATE_REPORT: ("00741000", "00404041", "00741238", "0074100E"),
    EventType.PROGRESS_REPORT: ("00741002",),
    EventType.ASSIGNED: ("00404025", "00404026", "00404027", "00404034"),
}
ASSIGNMENT_KEYS = frozenset(_INFO[EventType.ASSIGNED])
PROGRESS_KEY = "00741002"
READINESS_KEY = "00404041"


@dataclass(frozen=True, slots=True)
class Event:
    workitem_uid: str
    type: EventType
    info: dict[str, Any]  # the event information attributes (DICOM JSON)

    def payload(self) -> bytes:
        body = {
            "00000002": {"vr": "UI", "Value": [UPS_EVENT_SOP_CLASS]},
            "00001000": {"vr": "UI", "Value": [self.workitem_uid]},
            "00001002": {"vr": "US", "Value": [int(self.type)]},
        }
        body.update(self.info)
        return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def from_workitem(uid: str, kind: EventType, attrs: dict[str, Any], **extra: Any) -> Event:
    info = {k: attrs[k] for k in _INFO.get(kind, ()) if k in attrs}
    info.update(extra)
    return Event(uid, kind, info)


def state_report(uid: str, attrs: dict[str, Any], state_code: str | None = None) -> Event:
    event = from_workitem(uid, EventType.STATE_REPORT, attrs)
    if state_code is not None:
        event.info["00741000"] = {"vr": "CS", "Value": [state_code]}
    return event


def cancel_requested(uid: str, info: dict[str, Any]) -> Event:
    return Event(uid, EventType.CANCEL_REQUESTED, info)


def scp_status_change(status: str) -> Event:
    """SCP Status Change (Table CC.2.4-1): "GOING DOWN", or "RESTARTED" with both lists WARM START, since
    subscriptions and work items live in PostgreSQL and survive any restart of the archive."""
    info = {"00741242": {"vr": "CS", "Value": [status]}}  # SCPStatus
    if status == "RESTARTED":
        info["00741244"] = {"vr": "CS", "Value": ["WARM START"]}  # SubscriptionListStatus
        info["00741246"] = {"vr": "CS", "Value": ["WARM START"]}  # UnifiedProcedureStepListStatus
    return Event(GLOBAL_SUBSCRIPTION_UID, EventType.SCP_STATUS_CHANGE, info)


def gap_notice(first: int, last: int) -> bytes:
    """What a subscriber gets instead of events first..last that were dropped unacknowledged
    (worklist.retention): our private elements only, and no sequence element, so that it is no event."""
    text = (
        f"UPS events {first}-{last} were dropped unacknowledged (queue bound or retention); "
        "search the worklist to catch up"
    )
    body = {
        PRIVATE_CREATOR_KEY: {"vr": "LO", "Value": [PRIVATE_CREATOR]},
        DROPPED_FIRST_KEY: {"vr": "UV", "Value": [first]},
        DROPPED_LAST_KEY: {"vr": "UV", "Value": [last]},
        DROPPED_TEXT_KEY: {"vr": "LT", "Value": [text]},
    }
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def with_sequence(payload: bytes, sequence: int) -> bytes:
    """The report a subscriber receives: Message ID and our private sequence element added."""
    body = orjson.loads(payload)
    body["00000110"] = {"vr": "US", "Value": [(sequence - 1) % 0xFFFF + 1]}
    body[PRIVATE_CREATOR_KEY] = {"vr": "LO", "Value": [PRIVATE_CREATOR]}
    body[SEQUENCE_KEY] = {"vr": "UV", "Value": [sequence]}
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


async def lock_subscribers(conn: asyncpg.Connection, partition_key: int, titles: list[str]) -> None:
    """Lock the subscriber rows for update, in AE title order: what emit does, and what a writer that inserts
    subscriptions (whose foreign key share-locks the row) must do before, or two such writers each holding
    the share lock and waiting to upgrade it deadlock."""
    await conn.execute(
        """SELECT 1 FROM ups_subscriber WHERE partition_key = $1 AND ae_title = ANY($2::text[])
           ORDER BY ae_title FOR UPDATE""",
        partition_key,
        titles,
    )


async def emit(conn: asyncpg.Connection, partition_key: int, deliveries: Iterable[tuple[str, Event]]) -> int:
    """Queue (AE title, event) pairs in the caller's transaction, in order per AE; returns how many.

    Call it late in the transaction: the subscriber rows stay locked until commit.
    """
    per_ae: dict[str, list[Event]] = {}
    for ae, event in deliveries:
        per_ae.setdefault(ae, []).append(event)
    if not per_ae:
        return 0
    titles = sorted(per_ae)
    await lock_subscribers(conn, partition_key, titles)
    rows = await conn.fetch(
        """UPDATE ups_subscriber s SET last_sequence = s.last_sequence + c.n
           FROM unnest($2::text[], $3::bigint[]) AS c(ae, n)
           WHERE s.partition_key = $1 AND s.ae_title = c.ae
           RETURNING s.ae_title, s.last_sequence""",
        partition_key,
        titles,
        [len(per_ae[t]) for t in titles],
    )
    records: list[tuple[Any, ...]] = []
    for row in rows:
        events = per_ae[row["ae_title"]]
        first = row["last_sequence"] - len(events) + 1
        for n, event in enumerate(events):
            records.append(
                (
                    partition_key,
                    row["ae_title"],
                    first + n,
                    event.workitem_uid,
                    int(event.type),
                    event.payload(),
                )
            )
    await conn.executemany(
        """INSERT INTO ups_event (partition_key, ae_title, sequence, workitem_uid, event_type, payload)
           VALUES ($1, $2, $3, $4, $5, $6)""",
        records,
    )
    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, str(partition_key))
    return len(records)


def fan_out(titles: Sequence[str], events: Sequence[Event]) -> list[tuple[str, Event]]:
    return [(ae, e) for ae in titles for e in events]


@dataclass(frozen=True, slots=True)
class Delivered:
    sequence: int
    payload: bytes


async def read_after(
    conn: asyncpg.Connection | asyncpg.Pool, partition_key: int, ae_title: str, after: int, limit: int = 500
) -> list[Delivered]:
    rows = await conn.fetch(
        """SELECT sequence, payload FROM ups_event
           WHERE partition_key = $1 AND ae_title = $2 AND sequence > $3 ORDER BY sequence LIMIT $4""",
        partition_key,
        ae_title,
        after,
        limit,
    )
    return [Delivered(r["sequence"], with_sequence(r["payload"], r["sequence"])) for r in rows]
