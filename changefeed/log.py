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
MAX_SEQUENCE = 2**63 - 1  # sequences and partition ordinals are bigint


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
    row = await conn.fetchrow(
        """UPDATE changefeed_counter
           SET last_sequence = last_sequence + $1,
               last_timestamp = greatest(clock_timestamp(), last_timestamp)
           RETURNING last_sequence, last_timestamp""",
        len(changes),
    )
    last, timestamp = row["last_sequence"], row["last_timestamp"]
    first = last - len(changes) + 1
    # The partition's ordinals continue from its last entry's. Every earlier append has committed and is
    # visible here: its holder released the counter lock at commit, and this statement's snapshot is taken
    # after the lock was granted (under REPEATABLE READ, the UPDATE above fails instead if another append
    # committed after this transaction's snapshot). So the counter is a statement of its own; the entries
    # and the notification (delivered at commit, never for a transaction that rolls back) are one.
    await conn.execute(
        """WITH entries AS (
               INSERT INTO changefeed (sequence, partition_key, partition_ordinal, study_instance_uid,
                   series_instance_uid, sop_instance_uid, instance_key, action, "timestamp")
               SELECT $1::bigint + t.n - 1, $2, o.last + t.n, t.study, t.series, t.sop, t.key, t.action, $3
               FROM unnest($4::text[], $5::text[], $6::text[], $7::bigint[], $8::smallint[])
                    WITH ORDINALITY AS t(study, series, sop, key, action, n),
                    (SELECT coalesce(max(partition_ordinal), 0) AS last FROM changefeed
                     WHERE partition_key = $2) AS o)
           SELECT pg_notify($9, $10)""",
        first,
        partition_key,
        timestamp,
        [c.study_instance_uid for c in changes],
        [c.series_instance_uid for c in changes],
        [c.sop_instance_uid for c in changes],
        [c.instance_key for c in changes],
        [int(c.action) for c in changes],
        CHANNEL,
        str(last),
    )
    return last


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


async def _partition_ordinal_from(
    conn: asyncpg.Connection | asyncpg.Pool, partition_key: int, sequence: int
) -> int | None:
    """The ordinal of the partition's first entry at or after `sequence` (None: it has none there)."""
    return await conn.fetchval(
        """SELECT partition_ordinal FROM changefeed WHERE partition_key = $1 AND sequence >= $2
           ORDER BY sequence LIMIT 1""",
        partition_key,
        sequence,
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
    are dense, so without a partition the offset is arithmetic. Within a partition the same holds for the
    partition's ordinals (migration 0021): the window becomes an ordinal range and the offset is added to
    its first ordinal, so no read walks the entries it skips."""
    first = await (
        _first_sequence_at(conn, start)
        if start is not None
        else conn.fetchval("SELECT min(sequence) FROM changefeed")
    )
    if first is None:
        return []
    low = int(first)
    if low + offset > MAX_SEQUENCE:  # past every sequence (and ordinal), which PostgreSQL could not bind
        return []
    high = await _first_sequence_at(conn, end) if end is not None else None
    # the timestamps too: the same entries as the sequence range, kept so a clock set back cannot widen it
    conditions = ['($2::timestamptz IS NULL OR c."timestamp" >= $2)']
    conditions.append('($3::timestamptz IS NULL OR c."timestamp" < $3)')
    args: list[object] = [limit, start, end]
    if partition_key is None:
        order = "c.sequence"
        conditions.append("c.sequence >= $4")
        args.append(low + offset)
        if high is not None:
            conditions.append("c.sequence < $5")
            args.append(high)
    else:
        order = "c.partition_ordinal"
        first_ordinal = await _partition_ordinal_from(conn, partition_key, low)
        if first_ordinal is None:
            return []
        # the window ends before the partition's first entry at `high` (or with the partition's feed)
        end_ordinal = await _partition_ordinal_from(conn, partition_key, high) if high is not None else None
        if end_ordinal is not None and first_ordinal + offset >= end_ordinal:
            return []
        conditions += ["c.partition_key = $4", "c.partition_ordinal >= $5"]
        args += [partition_key, first_ordinal + offset]
        if end_ordinal is not None:
            conditions.append("c.partition_ordinal < $6")
            args.append(end_ordinal)
    rows = await conn.fetch(
        f"{_select(include_metadata)} WHERE {' AND '.join(conditions)} ORDER BY {order} LIMIT $1",
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
