"""Deleting instances: index rows, the blob-deletion queue and the change feed in one transaction."""

from __future__ import annotations

import asyncpg

from changefeed.log import Action, Change, append
from indexer.writes import RemovedInstance, remove_instances


async def delete_instances(
    pool: asyncpg.Pool,
    partition_key: int,
    study_uid: str,
    series_uid: str | None = None,
    sop_uid: str | None = None,
) -> list[RemovedInstance]:
    """Remove the addressed instances; what was removed (empty when nothing matched).

    The objects themselves are deleted later by archive.maintenance, from the queue this transaction fills.
    """
    async with pool.acquire() as conn, conn.transaction():
        return await remove_in(conn, partition_key, study_uid, series_uid, sop_uid)


async def remove_in(
    conn: asyncpg.Connection,
    partition_key: int,
    study_uid: str,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    *,
    keep_objects: bool = False,
) -> list[RemovedInstance]:
    """delete_instances in the caller's transaction (retention/ checks its rules first, in the same one).
    `keep_objects`: the objects are not queued for deletion (the caller keeps them for a restore window).
    The change feed append comes last, as it must."""
    removed = await remove_instances(
        conn, partition_key, study_uid, series_uid, sop_uid, keep_objects=keep_objects
    )
    await append(
        conn,
        partition_key,
        [
            Change(
                r.study_instance_uid, r.series_instance_uid, r.sop_instance_uid, r.instance_key, Action.DELETE
            )
            for r in removed
        ],
    )
    return removed
