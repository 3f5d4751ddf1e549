"""DELETE with retention rules: the one entry for deleting instances (routes, expiry).

Checks the study's legal hold and minimum retention, then removes through archive.removal (index rows,
change feed entries). With a delete delay the objects are kept for the restore window instead of queued.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from archive.removal import remove_in
from indexer.writes import RemovedInstance, lock_study_row
from retention.guard import check_deletion, lock_study
from retention.policy import RetentionPolicy, get_policy
from retention.window import keep_objects, queue_for_deletion


@dataclass(frozen=True, slots=True)
class Deletion:
    removed: list[RemovedInstance]  # empty: nothing matched (404)
    restorable_until: datetime | None  # the end of the restore window; None: the objects go at once


async def delete_in(
    conn: asyncpg.Connection,
    partition_key: int,
    study_uid: str,
    series_uid: str | None,
    sop_uid: str | None,
    now: datetime,
    policy: RetentionPolicy | None = None,
) -> Deletion:
    """Delete the addressed instances in the caller's transaction. Raises DeletionRefused when the study is
    held or younger than the minimum."""
    await lock_study(conn, partition_key, study_uid)
    policy = policy or await get_policy(conn, partition_key)
    await check_deletion(conn, partition_key, study_uid, policy, now)
    if policy.delete_delay_days == 0:
        return Deletion(await remove_in(conn, partition_key, study_uid, series_uid, sop_uid), None)
    scope = (study_uid, series_uid, sop_uid)
    # the study row before the instance rows that keep_objects locks: the order of every writer
    await lock_study_row(conn, partition_key, study_uid)
    until = now + timedelta(days=policy.delete_delay_days)
    kept = await keep_objects(conn, partition_key, scope, now, until)
    removed = await remove_in(conn, partition_key, *scope, keep_objects=True)
    # an instance stored into the study after the copy and removed with it is deleted at once, as without a
    # delay, rather than left to the orphan sweep
    await queue_for_deletion(conn, [r.storage_key for r in removed if r.storage_key not in kept])
    return Deletion(removed, until)


async def delete_instances(
    pool: asyncpg.Pool,
    partition_key: int,
    study_uid: str,
    series_uid: str | None,
    sop_uid: str | None,
    now: datetime,
) -> Deletion:
    """delete_in in a transaction of its own (a DELETE request)."""
    async with pool.acquire() as conn, conn.transaction():
        return await delete_in(conn, partition_key, study_uid, series_uid, sop_uid, now)
