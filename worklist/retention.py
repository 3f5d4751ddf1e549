"""The bound on UPS event queues: a subscriber that never acknowledges must not grow the outbox forever.

Acknowledged events are deleted at once (worklist.subscriptions.ack). Of the others, a periodic prune drops,
per subscriber, those more than `max_queue` behind its latest sequence and those older than `retention`.
Both are a prefix of the subscriber's queue (sequences are given in commit order), so the subscriber's
`dropped_sequence` (migration 0011) records where the loss ends, and its next connection is told which
events it will never get (dicomweb/routes/ws.py).

PS3.18 does not queue events for a subscriber that is not connected at all (dcm4chee sends to open
WebSockets only); the queue is our extension, so bounding it takes nothing a client could rely on.

Lock order is that of writers: the subscriber rows first, in (partition, AE title) order, then their
events. `emit` locks subscribers of one partition in AE title order and `ack` locks the subscriber before it
deletes events, so the prune can deadlock with neither. Every process runs it; the deletes are idempotent.
"""

from __future__ import annotations

import datetime as dt
import logging

import asyncpg

from indexer.background import Periodic

log = logging.getLogger(__name__)

PRUNE_INTERVAL = 60.0  # seconds


async def prune(conn: asyncpg.Connection, max_queue: int, retention: dt.timedelta) -> int:
    """Drop unacknowledged events beyond the bounds, in one transaction; returns how many."""
    async with conn.transaction():
        cutoff = await conn.fetchval("SELECT clock_timestamp() - $1::interval", retention)
        # subscribers with something to drop: the oldest queued event is too old, or the queue too long
        over = await conn.fetch(
            """SELECT s.partition_key, s.ae_title FROM ups_subscriber s
               CROSS JOIN LATERAL (SELECT e.sequence, e.created_at FROM ups_event e
                                   WHERE e.partition_key = s.partition_key AND e.ae_title = s.ae_title
                                   ORDER BY e.sequence LIMIT 1) AS oldest
               WHERE oldest.sequence <= s.last_sequence - $1 OR oldest.created_at < $2
               ORDER BY s.partition_key, s.ae_title""",
            max_queue,
            cutoff,
        )
        if not over:
            return 0
        keys, titles = [r["partition_key"] for r in over], [r["ae_title"] for r in over]
        await conn.execute(
            """SELECT 1 FROM ups_subscriber s JOIN unnest($1::int[], $2::text[]) AS o(p, ae)
                 ON s.partition_key = o.p AND s.ae_title = o.ae
               ORDER BY s.partition_key, s.ae_title FOR UPDATE OF s""",
            keys,
            titles,
        )
        dropped = await conn.fetch(
            """WITH gone AS (
                   DELETE FROM ups_event e USING ups_subscriber s, unnest($1::int[], $2::text[]) AS o(p, ae)
                   WHERE s.partition_key = o.p AND s.ae_title = o.ae
                     AND e.partition_key = s.partition_key AND e.ae_title = s.ae_title
                     AND (e.sequence <= s.last_sequence - $3 OR e.created_at < $4)
                   RETURNING e.partition_key, e.ae_title, e.sequence)
               UPDATE ups_subscriber s SET dropped_sequence = greatest(s.dropped_sequence, g.last)
               FROM (SELECT partition_key, ae_title, max(sequence) AS last, count(*) AS n
                     FROM gone GROUP BY partition_key, ae_title) AS g
               WHERE s.partition_key = g.partition_key AND s.ae_title = g.ae_title
               RETURNING g.n""",
            keys,
            titles,
            max_queue,
            cutoff,
        )
        return sum(r["n"] for r in dropped)


class EventPruner(Periodic):
    """Runs `prune` every PRUNE_INTERVAL seconds in the app's lifespan."""

    def __init__(self, pool: asyncpg.Pool, max_queue: int, retention: dt.timedelta) -> None:
        super().__init__(
            "ups-event-pruner", self._prune, PRUNE_INTERVAL, lambda _exc: log.exception("UPS event prune")
        )
        self._pool, self._max_queue, self._retention = pool, max_queue, retention

    async def _prune(self) -> None:
        async with self._pool.acquire() as conn:
            dropped = await prune(conn, self._max_queue, self._retention)
        if dropped:
            log.warning("dropped %d unacknowledged UPS events (queue bound or retention)", dropped)
