"""Subscriptions (UPS Watch SOP Class, PS3.4 CC.2.3; PS3.18 11.10-11.12), materialised per work item.

A subscriber is an AE title within a partition. Subscribing to a work item sends it an initial state
report. A Worklist (or Filtered Worklist) subscription subscribes the AE to every non-final work item it
matches now, with an initial state report each, and to every matching item created later; creates hold the
partition's advisory lock shared and global subscribes hold it exclusively, so no item falls between the
two. A filter is evaluated then and only then, never on Update: PS3.4 Table CC.2.3-2 changes an AE's
subscription to an item on subscription actions and on creation only. Unsubscribing from the worklist
removes the global subscription and every work item subscription of the AE; suspending removes only the
global one (the AE keeps what it has, gets no new items).
"""

from __future__ import annotations

import asyncpg

from worklist import events
from worklist.requirements import UPS_EVENT_SOP_CLASS
from worklist.search import Args, Filter, where_sql
from worklist.store import UpsError, lock_workitem, partition_lock


async def _ensure_subscriber(conn: asyncpg.Connection, partition_key: int, ae_title: str) -> None:
    await conn.execute(
        "INSERT INTO ups_subscriber (partition_key, ae_title) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        partition_key,
        ae_title,
    )


async def subscribe_workitem(
    pool: asyncpg.Pool, partition_key: int, ae_title: str, uid: str, deletion_lock: bool
) -> None:
    async with pool.acquire() as conn, conn.transaction():
        row = await lock_workitem(
            conn, partition_key, uid
        )  # orders the initial report among the item's events
        await _ensure_subscriber(conn, partition_key, ae_title)
        # for update before the subscription's foreign key share-locks it (events.lock_subscribers)
        await events.lock_subscribers(conn, partition_key, [ae_title])
        await conn.execute(
            """INSERT INTO ups_subscription (workitem_key, partition_key, ae_title, deletion_lock)
               VALUES ($1, $2, $3, $4)
               ON CONFLICT (workitem_key, ae_title) DO UPDATE SET deletion_lock = EXCLUDED.deletion_lock""",
            row.key,
            partition_key,
            ae_title,
            deletion_lock,
        )
        await events.emit(conn, partition_key, [(ae_title, events.state_report(uid, row.attrs))])


async def subscribe_worklist(
    pool: asyncpg.Pool,
    partition_key: int,
    ae_title: str,
    filters: list[Filter] | None,
    filter_text: str | None,
    deletion_lock: bool,
) -> int:
    """Global subscription (filtered when `filters`); returns how many existing items it subscribed to."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", partition_lock(partition_key))
        await _ensure_subscriber(conn, partition_key, ae_title)
        filtered = filters is not None
        await conn.execute(
            """INSERT INTO ups_global_subscription (partition_key, ae_title, filtered, filter, deletion_lock)
               VALUES ($1, $2, $3, $4, $5)
               ON CONFLICT (partition_key, ae_title, filtered)
               DO UPDATE SET filter = EXCLUDED.filter, deletion_lock = EXCLUDED.deletion_lock""",
            partition_key,
            ae_title,
            filtered,
            filter_text,
            deletion_lock,
        )
        # the subscriber's sequence, locked until commit like every emit (worklist.events)
        base = await conn.fetchval(
            "SELECT last_sequence FROM ups_subscriber WHERE partition_key = $1 AND ae_title = $2 FOR UPDATE",
            partition_key,
            ae_title,
        )
        args = Args([partition_key, ae_title, deletion_lock, base, UPS_EVENT_SOP_CLASS])
        where = where_sql(filters or [], args)
        # One statement, whatever the size of the worklist: the initial state reports are built in SQL from
        # the rows as locked (FOR UPDATE gives their latest version, so a state change committed meanwhile
        # is in the report rather than lost between the report and the subscription).
        count = await conn.fetchval(
            f"""WITH candidates AS (
                    SELECT w.workitem_key, w.sop_instance_uid, w.attrs->'00741000' AS state,
                           w.attrs->'00404041' AS readiness
                    FROM ups_workitem w
                    WHERE w.partition_key = $1 AND w.state IN (0, 1) AND {where}
                    ORDER BY w.workitem_key FOR UPDATE),
                added AS (
                    INSERT INTO ups_subscription (workitem_key, partition_key, ae_title, deletion_lock)
                    SELECT workitem_key, $1, $2, $3 FROM candidates
                    ON CONFLICT DO NOTHING RETURNING workitem_key),
                queued AS (
                    INSERT INTO ups_event
                        (partition_key, ae_title, sequence, workitem_uid, event_type, payload)
                    SELECT $1, $2, $4 + row_number() OVER (ORDER BY c.workitem_key), c.sop_instance_uid, 1,
                           convert_to((jsonb_build_object(
                               '00000002', jsonb_build_object('vr', 'UI', 'Value',
                                                              jsonb_build_array($5::text)),
                               '00001000', jsonb_build_object('vr', 'UI', 'Value',
                                                              jsonb_build_array(c.sop_instance_uid)),
                               '00001002', jsonb_build_object('vr', 'US', 'Value', jsonb_build_array(1)))
                           || jsonb_strip_nulls(jsonb_build_object('00741000', c.state,
                                                                   '00404041', c.readiness)))::text, 'UTF8')
                    FROM candidates c JOIN added a USING (workitem_key)
                    RETURNING 1)
                SELECT count(*) FROM queued""",
            *args.values,
        )
        if count:
            await conn.execute(
                "UPDATE ups_subscriber SET last_sequence = $3 WHERE partition_key = $1 AND ae_title = $2",
                partition_key,
                ae_title,
                base + count,
            )
            await conn.execute("SELECT pg_notify($1, $2)", events.CHANNEL, str(partition_key))
        return count


async def unsubscribe_workitem(pool: asyncpg.Pool, partition_key: int, ae_title: str, uid: str) -> None:
    async with pool.acquire() as conn, conn.transaction():
        row = await lock_workitem(conn, partition_key, uid)
        done = await conn.fetchval(
            "DELETE FROM ups_subscription WHERE workitem_key = $1 AND ae_title = $2 RETURNING 1",
            row.key,
            ae_title,
        )
        if not done:
            raise UpsError(404, f"{ae_title} is not subscribed to workitem {uid}")


async def unsubscribe_worklist(pool: asyncpg.Pool, partition_key: int, ae_title: str, filtered: bool) -> None:
    async with pool.acquire() as conn, conn.transaction():
        removed = await conn.fetchval(
            """DELETE FROM ups_global_subscription
               WHERE partition_key = $1 AND ae_title = $2 AND filtered = $3 RETURNING 1""",
            partition_key,
            ae_title,
            filtered,
        )
        items = await conn.execute(
            "DELETE FROM ups_subscription WHERE partition_key = $1 AND ae_title = $2", partition_key, ae_title
        )
        if not removed and items == "DELETE 0":
            raise UpsError(404, f"{ae_title} has no worklist subscription")


async def suspend_worklist(pool: asyncpg.Pool, partition_key: int, ae_title: str, filtered: bool) -> None:
    removed = await pool.fetchval(
        """DELETE FROM ups_global_subscription WHERE partition_key = $1 AND ae_title = $2 AND filtered = $3
           RETURNING 1""",
        partition_key,
        ae_title,
        filtered,
    )
    if not removed:
        raise UpsError(
            404, f"{ae_title} has no {'filtered ' if filtered else ''}worklist subscription to suspend"
        )


async def ack(pool: asyncpg.Pool, partition_key: int, ae_title: str, sequence: int) -> int:
    """Record that the subscriber has every event up to `sequence`, and drop those events from the queue
    (the queue holds only what is not yet acknowledged); returns the acknowledged sequence."""
    async with pool.acquire() as conn, conn.transaction():
        acked_to = await conn.fetchval(
            """UPDATE ups_subscriber SET acked_sequence = greatest(acked_sequence, least($3, last_sequence))
               WHERE partition_key = $1 AND ae_title = $2 RETURNING acked_sequence""",
            partition_key,
            ae_title,
            sequence,
        )
        if acked_to is None:
            return 0
        await conn.execute(
            "DELETE FROM ups_event WHERE partition_key = $1 AND ae_title = $2 AND sequence <= $3",
            partition_key,
            ae_title,
            acked_to,
        )
        return acked_to


async def position(pool: asyncpg.Pool, partition_key: int, ae_title: str) -> tuple[int, int] | None:
    """(acknowledged, dropped): the subscriber has every event up to the first, and events up to the second
    that it had not acknowledged were dropped (worklist.retention); None for an AE that never subscribed."""
    row = await pool.fetchrow(
        """SELECT acked_sequence, dropped_sequence FROM ups_subscriber
           WHERE partition_key = $1 AND ae_title = $2""",
        partition_key,
        ae_title,
    )
    return None if row is None else (row[0], row[1])
