"""SCP Status Change events (PS3.4 CC.2.4, Event Type 4): RESTARTED when the archive starts, GOING DOWN when
it stops gracefully, each once, to every subscriber, through the outbox like any other event.

"The archive" is every process sharing the database, so a process that starts while others run is no
restart, and one that stops while others run is no shutdown. Each process holds a session-level advisory lock
shared on a connection of its own for as long as it lives:

* starting, it first tries the lock exclusively. That succeeds only when no other process holds it, i.e. the
  archive was down (stopped or crashed): this process reports RESTARTED, then takes the lock shared before it
  lets go of the exclusive one. A process starting meanwhile waits for the shared lock until then.
* stopping, it lets go of its shared lock and tries the lock exclusively. Only the last process succeeds,
  and reports GOING DOWN, recording it in ups_scp_state (migration 0011).
* a process that starts while the last one is reporting GOING DOWN fails the exclusive try, waits for the
  shared lock, and then finds `down` set: it reports RESTARTED all the same. The row lock on ups_scp_state
  makes sure that only one of several such processes does.

A process that dies loses its lock with its connection and reports nothing, which is right: a crash is not
a graceful shutdown. A live process whose lock connection is lost (PostgreSQL restarted, the backend was
terminated) would otherwise hold nothing while it serves: another process could then take itself for the
first (RESTARTED) or the last (GOING DOWN). It notices the loss at once (asyncpg's termination listener),
connects again until it can, and rejoins like a starting process that is not the first: shared lock, and
RESTARTED only if the last process meanwhile reported GOING DOWN.

Subscriptions and work items live in PostgreSQL, so a restart is a WARM START of both lists.

With one process left, GOING DOWN cannot reach a connected WebSocket before the server closes it; it waits in
the queue and is delivered, in order before RESTARTED, when the subscriber reconnects.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

import asyncpg

from indexer.sessions import server_settings
from worklist import events

log = logging.getLogger(__name__)

ALIVE_LOCK = 0x55505357_414C4956 & 0x7FFFFFFFFFFFFFFF  # held shared by every live archive process
RESTARTED, GOING_DOWN = "RESTARTED", "GOING DOWN"


async def announce(conn: asyncpg.Connection, status: str) -> int:
    """Queue an SCP Status Change for every AE with a subscription (global or to a work item), in one
    transaction; returns how many."""
    async with conn.transaction():
        rows = await conn.fetch(
            """SELECT s.partition_key, s.ae_title FROM ups_subscriber s
               WHERE EXISTS (SELECT FROM ups_global_subscription g
                             WHERE g.partition_key = s.partition_key AND g.ae_title = s.ae_title)
                  OR EXISTS (SELECT FROM ups_subscription u
                             WHERE u.partition_key = s.partition_key AND u.ae_title = s.ae_title)
               ORDER BY s.partition_key, s.ae_title"""
        )
        event = events.scp_status_change(status)
        count = 0
        for partition_key, group in itertools.groupby(rows, key=lambda r: r["partition_key"]):
            count += await events.emit(conn, partition_key, [(r["ae_title"], event) for r in group])
        return count


async def _report(conn: asyncpg.Connection, status: str, *, down: bool) -> None:
    """Announce `status` and record whether the archive is now down, in the caller's transaction."""
    count = await announce(conn, status)
    await conn.execute("UPDATE ups_scp_state SET down = $1", down)
    log.info("UPS SCP status %s reported to %d subscribers", status, count)


class ScpStatus:
    """One per process: reports RESTARTED at start when it is the first, GOING DOWN at stop when the last."""

    def __init__(self, database_url: str, *, retry_seconds: float = 1.0) -> None:
        self._dsn = database_url
        self._retry_seconds = retry_seconds
        self._conn: asyncpg.Connection | None = None
        self._rejoin: asyncio.Task[None] | None = None
        self.rejoined = 0  # how many times the lock was re-acquired after a lost connection

    async def start(self) -> bool:
        """Join the live processes; True when the archive was down and this process reported RESTARTED."""
        conn = await asyncpg.connect(self._dsn, server_settings=server_settings())
        first = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", ALIVE_LOCK))
        try:
            return await self._join(conn, first)
        finally:
            if first:
                await conn.execute("SELECT pg_advisory_unlock($1)", ALIVE_LOCK)

    async def _join(self, conn: asyncpg.Connection, first: bool) -> bool:
        """Hold the shared lock on `conn` from now on; report RESTARTED when first or after a GOING DOWN."""
        await conn.execute("SELECT pg_advisory_lock_shared($1)", ALIVE_LOCK)
        self._conn = conn
        conn.add_termination_listener(self._lost)
        try:
            async with conn.transaction():
                down = await conn.fetchval("SELECT down FROM ups_scp_state FOR UPDATE")
                restart = first or bool(down)
                if restart:
                    await _report(conn, RESTARTED, down=False)
            return restart
        except Exception:
            log.exception("UPS SCP status RESTARTED could not be reported")
            return False

    def _lost(self, conn: asyncpg.Connection) -> None:
        if conn is not self._conn:
            return
        self._conn = None
        log.warning("UPS SCP status: the connection holding the alive lock was lost; joining again")
        self._rejoin = asyncio.get_running_loop().create_task(self._join_again())

    async def _join_again(self) -> None:
        while True:
            try:
                conn = await asyncpg.connect(self._dsn, server_settings=server_settings())
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("UPS SCP status: cannot connect (%s); retrying", exc)
                await asyncio.sleep(self._retry_seconds)
                continue
            try:
                await self._join(conn, False)
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("UPS SCP status: cannot take the alive lock (%s); retrying", exc)
                self._conn = None
                await conn.close()
                await asyncio.sleep(self._retry_seconds)
                continue
            self.rejoined += 1
            return

    async def stop(self) -> bool:
        """Leave; True when this was the last live process and reported GOING DOWN."""
        if self._rejoin is not None:
            self._rejoin.cancel()
            await asyncio.gather(self._rejoin, return_exceptions=True)
            self._rejoin = None
        conn, self._conn = self._conn, None
        if conn is None:
            return False
        conn.remove_termination_listener(self._lost)
        try:
            await conn.execute("SELECT pg_advisory_unlock_shared($1)", ALIVE_LOCK)
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", ALIVE_LOCK):
                return False
            async with conn.transaction():
                await _report(conn, GOING_DOWN, down=True)
            return True
        except Exception:
            log.exception("UPS SCP status GOING DOWN could not be reported")
            return False
        finally:
            await conn.close()  # ends the session, and with it any lock still held
