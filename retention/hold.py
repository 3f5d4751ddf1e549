"""Legal hold on a study: placed and removed by owners; a held study refuses deletion, expiry skips it and
its objects in a restore window are not purged."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from retention.guard import held_since, lock_study


class NoSuchStudy(Exception):
    """Neither indexed nor in a restore window: there is nothing to hold (answered as 404)."""


async def study_known(conn: asyncpg.Connection, partition_key: int, study_uid: str) -> bool:
    """Whether the study is indexed or has deleted instances kept for a restore window."""
    return bool(
        await conn.fetchval(
            """SELECT EXISTS (SELECT 1 FROM study WHERE partition_key = $1 AND study_instance_uid = $2)
                   OR EXISTS (SELECT 1 FROM deleted_object
                              WHERE partition_key = $1 AND study_instance_uid = $2)""",
            partition_key,
            study_uid,
        )
    )


async def place_hold(
    conn: asyncpg.Connection, partition_key: int, study_uid: str, now: datetime, by: str, reason: str | None
) -> tuple[datetime, bool]:
    """Hold the study (in the caller's transaction); (held since, whether this call placed it). Placing a
    hold again keeps the first one's time."""
    await lock_study(conn, partition_key, study_uid)
    since = await held_since(conn, partition_key, study_uid)
    if since is not None:
        return since, False
    if not await study_known(conn, partition_key, study_uid):
        raise NoSuchStudy(study_uid)
    await conn.execute(
        """INSERT INTO legal_hold (partition_key, study_instance_uid, held_since, held_by, reason)
           VALUES ($1, $2, $3, $4, $5)""",
        partition_key,
        study_uid,
        now,
        by,
        reason,
    )
    return now, True


async def remove_hold(conn: asyncpg.Connection, partition_key: int, study_uid: str) -> bool:
    """Lift the hold; False when the study was not held."""
    await lock_study(conn, partition_key, study_uid)
    return (
        await conn.fetchval(
            "DELETE FROM legal_hold WHERE partition_key = $1 AND study_instance_uid = $2 RETURNING true",
            partition_key,
            study_uid,
        )
        is not None
    )
