"""Background upkeep of the blob store: deleting objects whose rows are gone, and sweeping orphans.

Both are safe to run in every process at once: the deletion queue is claimed with FOR UPDATE SKIP LOCKED,
and a sweep only removes objects older than a grace period that no index row references, checked right
before deleting (an upload younger than the grace period may still be on its way to the index).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

import asyncpg

from indexer.background import Periodic
from indexer.lookup import is_indexed
from storage.base import BlobRetainedError, BlobStore

log = logging.getLogger(__name__)

# Held (exclusively, for the whole copy) by `dicomweb backup`; every drain takes it shared for its
# transaction and skips its round while a backup holds it. So an object that the backup's snapshot still
# references cannot be deleted before the backup has copied it, and deletions simply wait (archive/backup.py).
DELETIONS_PAUSED_LOCK = 4405


async def drain_deletions(pool: asyncpg.Pool, store: BlobStore, *, batch: int = 200) -> int:
    """Delete queued objects; returns how many were removed. Failed deletes are retried later; none while
    a backup is copying objects (`DELETIONS_PAUSED_LOCK`)."""
    removed = 0
    while True:
        async with pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock_shared($1)", DELETIONS_PAUSED_LOCK):
                log.debug("object deletions paused while a backup copies objects")
                return removed
            rows = await conn.fetch(
                """SELECT storage_key FROM blob_deletion WHERE not_before <= now()
                   ORDER BY enqueued_at LIMIT $1 FOR UPDATE SKIP LOCKED""",
                batch,
            )
            if not rows:
                return removed
            done, failed = [], []
            for row in rows:
                try:
                    await store.delete(row[0])
                    done.append(row[0])
                except BlobRetainedError as exc:  # S3 Object Lock: not a failure, a date to come back at
                    await conn.execute(
                        "UPDATE blob_deletion SET not_before = $2 WHERE storage_key = $1", row[0], exc.until
                    )
                except Exception as exc:
                    log.warning("could not delete object %s: %s", row[0], exc)
                    failed.append(row[0])
            await conn.execute("DELETE FROM blob_deletion WHERE storage_key = ANY($1::text[])", done)
            await conn.execute(
                """UPDATE blob_deletion SET attempts = attempts + 1,
                       not_before = now() + least(interval '1 hour', interval '10 seconds' * 2 ^ attempts)
                   WHERE storage_key = ANY($1::text[])""",
                failed,
            )
            removed += len(done)
            if len(rows) < batch:
                return removed


async def unreferenced(conn: asyncpg.Connection | asyncpg.Pool, keys: list[str]) -> list[str]:
    """Those of these object keys that no index row references and that are not queued for deletion
    either, in the given order. Ask only about objects older than a grace period: a younger one may be an
    upload whose index row is still to commit."""
    referenced = await is_indexed(conn, keys)
    queued = {
        row[0]
        for row in await conn.fetch(
            "SELECT storage_key FROM blob_deletion WHERE storage_key = ANY($1::text[])", keys
        )
    }
    return [key for key in keys if key not in referenced and key not in queued]


async def sweep_orphans(
    pool: asyncpg.Pool, store: BlobStore, *, grace: timedelta = timedelta(hours=1), page: int = 500
) -> int:
    """Remove objects that no index row references and that are older than `grace`; returns the count."""
    cutoff = datetime.now(UTC) - grace
    removed = 0
    candidates: list[str] = []

    async def settle() -> int:
        orphans = await unreferenced(pool, candidates)
        for key in orphans:
            try:
                await store.delete(key)
            except BlobRetainedError as exc:  # S3 Object Lock: the deletion queue removes it when it may
                await pool.execute(
                    """INSERT INTO blob_deletion (storage_key, not_before) VALUES ($1, $2)
                       ON CONFLICT (storage_key) DO NOTHING""",
                    key,
                    exc.until,
                )
        candidates.clear()
        return len(orphans)

    async for info in store.list(""):
        if info.modified.astimezone(UTC) > cutoff:
            continue
        candidates.append(info.key)
        if len(candidates) >= page:
            removed += await settle()
    if candidates:
        removed += await settle()
    return removed


class Maintenance(Periodic):
    """Runs the deletion drain often and the orphan sweep rarely, until stopped; `poke()` drains now (called
    after a DELETE so that objects go promptly)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        store: BlobStore,
        *,
        drain_interval: float = 2.0,
        sweep_interval: float = 3600.0,
        grace: timedelta = timedelta(hours=1),
    ) -> None:
        super().__init__(
            "blob-maintenance",
            self._drain_and_sweep,
            drain_interval,
            lambda _exc: log.exception("blob maintenance failed; retrying"),
        )
        self._pool, self._store = pool, store
        self._sweep_interval, self._grace = sweep_interval, grace
        self._next_sweep: float | None = None

    async def _drain_and_sweep(self) -> None:
        loop = asyncio.get_running_loop()
        if self._next_sweep is None:
            self._next_sweep = loop.time() + 60.0  # not at start-up: let the process settle first
        await drain_deletions(self._pool, self._store)
        if loop.time() < self._next_sweep:
            return
        self._next_sweep = loop.time() + self._sweep_interval
        async with self._pool.acquire() as conn:
            # one sweeper at a time across processes
            if await conn.fetchval("SELECT pg_try_advisory_lock(4404)"):
                try:
                    removed = await sweep_orphans(self._pool, self._store, grace=self._grace)
                    if removed:
                        log.info("orphan sweep removed %d objects", removed)
                finally:
                    await conn.execute("SELECT pg_advisory_unlock(4404)")
