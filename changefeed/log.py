"""The change feed log: appended in the writer's transaction, read by sequence or by time window.

Sequences come from one counter row locked as the writer's last statement (see migration 0003 for why), so
they are dense and become visible in commit order. Entries are never updated: an entry's state (current,
replaced, deleted) is derived when it is read, from whether the version it names is still indexed.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

# One NOTIFY channel for every process sharing the database; the payload is the last sequence committed.
CHANNEL = "dicomweb_changefeed"


class Action(enum.IntEnum):
    CREATE = 0
    UPDATE = 1
    DELETE = 2


class State(enum.IntEnum):
    CURRENT = 0  # the version the entry names is the one indexed now
    REPLACED = 1  # the instance is indexed, but as a later version
    DELETED = 2  # the instance is not indexed any more


@dataclass(frozen=True, slots=True)
class Change:
    """One change to record, made by the caller's transaction."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    instance_key: int  # the version created, updated or deleted
    action: Action


@dataclass(frozen=True, slots=True)
class FeedEntry:
    sequence: int
    partition_name: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    action: Action
    timestamp: dt.datetime
    state: State
    metadata: bytes | None  # stored DICOM JSON (relative BulkDataURIs) of the current version, when asked


async def append(conn: asyncpg.Connection, partition_key: int, changes: Sequence[Change]) -> int:
    """Record `changes` in the caller's transaction; returns the last sequence they got (0 for none).

    Call it as the transaction's last statement: it takes the counter row lock, which is held until commit
    and serialises every writer's commit from here on.
    """
    if not changes:
        return 0
    # One statement (one round trip): the counter row's lock, the entries and the notification.
    return await conn.fetchval(
        """WITH counter AS (
               UPDATE changefeed_counter
               SET last_sequence = last_sequence + cardinality($3::text[]),
                   last_timestamp = greatest(clock_timestamp(), last_timestamp)
               RETURNING last_sequence, last_timestamp),
           entries AS (
               INSERT INTO changefeed (sequence, partition_key, study_instance_uid, series_instance_uid,
                   sop_instance_uid, instance_key, action, "timestamp")
               SELECT c.last_sequence - cardinality($3::text[]) + t.n, $2, t.study, t.series, t.sop, t.key,
                   t.action, c.last_timestamp
               FROM counter c,
                    unnest($3::text[], $4::text[], $5::text[], $6::bigint[], $7::smallint[])
                        WITH ORDINALITY AS t(study, series, sop, key, action, n))
           -- delivered to listeners at commit, never for a transaction that rolls back
           SELECT last_sequence FROM counter, pg_notify($1, last_sequence::text)""",
        CHANNEL,
        partition_key,
        [c.study_instance_uid for c in changes],
        [c.series_instance_uid for c in changes],
        [c.sop_instance_uid for c in changes],
        [c.instance_key for c in changes],
        [int(c.action) for c in changes],
    )


def _select(include_metadata: bool) -> str:
    metadata = "i.metadata" if include_metadata else "NULL::bytea"
    return f"""SELECT c.sequence, p.name AS partition_name, c.study_instance_uid, c.series_instance_uid,
                   c.sop_instance_uid, c.action, c."timestamp",
                   CASE WHEN i.instance_key IS NOT NULL THEN 0
                        WHEN EXISTS (SELECT 1 FROM instance j WHERE j.partition_key = c.partition_key
                                     AND j.sop_instance_uid = c.sop_instance_uid) THEN 1
                        ELSE 2 END AS state,
                   {metadata} AS metadata
               FROM changefeed c
               JOIN partition p ON p.partition_key = c.partition_key
               LEFT JOIN instance i ON i.instance_key = c.instance_key"""


def _entries(rows: list[asyncpg.Record]) -> list[FeedEntry]:
    return [
        FeedEntry(
            r["sequence"],
            r["partition_name"],
            r["study_instance_uid"],
            r["series_instance_uid"],
            r["sop_instance_uid"],
            Action(r["action"]),
            r["timestamp"],
            State(r["state"]),
            r["metadata"],
        )
        for r in rows
    ]


async def read_after(
    conn: asyncpg.Connection | asyncpg.Pool,
    after: int,
    limit: int,
    *,
    partition_key: int | None = None,
    include_metadata: bool = False,
) -> list[FeedEntry]:
    """Entries with a sequence above `after`, ascending (the v1 read, and what consumers tail)."""
    if partition_key is None:
        where, args = "c.sequence > $1", [after, limit]
    else:
        where, args = "c.partition_key = $3 AND c.sequence > $1", [after, limit, partition_key]
    rows = await conn.fetch(
        f"{_select(include_metadata)} WHERE {where} ORDER BY c.sequence LIMIT $2",
        *args,
    )
    return _entries(rows)


async def _first_sequence_at(conn: asyncpg.Connection | asyncpg.Pool, moment: dt.datetime) -> int | None:
    """The lowest sequence whose timestamp is at or after `moment` (None: no such entry). Two probes of the
    timestamp index: the first timestamp at or after it, then the lowest sequence with that timestamp."""
    return await conn.fetchval(
        """SELECT min(sequence) FROM changefeed WHERE "timestamp" =
               (SELECT min("timestamp") FROM changefeed WHERE "timestamp" >= $1)""",
        moment,
    )


async def read_window(
    conn: asyncpg.Connection | asyncpg.Pool,
    start: dt.datetime | None,
    end: dt.datetime | None,
    offset: int,
    limit: int,
    *,
    partition_key: int | None = None,
    include_metadata: bool = False,
) -> list[FeedEntry]:
    """Entries with start <= timestamp < end, ascending, skipping `offset` of them (Azure's v2 read).

    Timestamps never go backwards along the sequence (the counter keeps them so: `append`), so a
    window is a sequence range [first at start, first at end), found with the timestamp index: a read then
    costs its page wherever the window lies in the feed, not a walk from the feed's first entry. Sequences
    are dense, so without a partition the offset is arithmetic too; within a partition it is walked, from
    the window's start only."""
    first = await (
        _first_sequence_at(conn, start)
        if start is not None
        else conn.fetchval("SELECT min(sequence) FROM changefeed")
    )
    if first is None:
        return []
    low = int(first)
    high = await _first_sequence_at(conn, end) if end is not None else None
    # the timestamps too: the same entries as the sequence range, kept so a clock set back cannot widen it
    conditions = ['($3::timestamptz IS NULL OR c."timestamp" >= $3)']
    conditions.append('($4::timestamptz IS NULL OR c."timestamp" < $4)')
    args: list[object] = [0, limit, start, end]
    if partition_key is None:
        args.append(low + offset)
    else:
        args[0] = offset
        args.append(low)
        conditions.append(f"c.partition_key = ${len(args) + 1}")
        args.append(partition_key)
    conditions.append("c.sequence >= $5")
    if high is not None:
        conditions.append(f"c.sequence < ${len(args) + 1}")
        args.append(high)
    rows = await conn.fetch(
        f"{_select(include_metadata)} WHERE {' AND '.join(conditions)} "
        "ORDER BY c.sequence OFFSET $1 LIMIT $2",
        *args,
    )
    return _entries(rows)


async def latest(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    partition_key: int | None = None,
    include_metadata: bool = False,
) -> FeedEntry | None:
    """The most recent entry (of one partition, when given)."""
    where, args = ("", []) if partition_key is None else ("WHERE c.partition_key = $1", [partition_key])
    rows = await conn.fetch(f"{_select(include_metadata)} {where} ORDER BY c.sequence DESC LIMIT 1", *args)
    entries = _entries(rows)
    return entries[0] if entries else None


async def last_sequence(conn: asyncpg.Connection | asyncpg.Pool) -> int:
    """The highest committed sequence of the whole feed (0 when empty)."""
    return await conn.fetchval("SELECT last_sequence FROM changefeed_counter")
