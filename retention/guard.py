"""Whether a study may be deleted now: its legal hold and its partition's minimum retention.

Deletion, restore and hold changes of one study take the study's lock first, so a hold placed while a
delete runs either commits first (the delete is refused) or waits for the delete to commit.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import asyncpg

from retention.policy import RetentionPolicy

# class of the two-key advisory locks on studies (the second key hashes partition and UID); the two-key
# space is apart from the single bigint keys the archive's other locks use
STUDY_LOCK_CLASS = 4420


class DeletionRefused(Exception):
    """The study must not be deleted yet; the message says why and until when (answered as 409)."""


async def lock_study(conn: asyncpg.Connection, partition_key: int, study_uid: str) -> None:
    """Serialise retention decisions about one study, until the caller's transaction ends."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext($2::text || '/' || $3))",
        STUDY_LOCK_CLASS,
        str(partition_key),
        study_uid,
    )


def minimum_retention_until(first_ingest: datetime, policy: RetentionPolicy) -> datetime | None:
    """When a study first stored at `first_ingest` may be deleted (None: no minimum)."""
    if policy.minimum_retention_days is None:
        return None
    return first_ingest + timedelta(days=policy.minimum_retention_days)


async def first_ingest(conn: asyncpg.Connection, partition_key: int, study_uid: str) -> datetime | None:
    """The study's first ingest time (its row's creation; a restore gives back the deleted study's)."""
    return await conn.fetchval(
        "SELECT created_at FROM study WHERE partition_key = $1 AND study_instance_uid = $2",
        partition_key,
        study_uid,
    )


async def held_since(conn: asyncpg.Connection, partition_key: int, study_uid: str) -> datetime | None:
    return await conn.fetchval(
        "SELECT held_since FROM legal_hold WHERE partition_key = $1 AND study_instance_uid = $2",
        partition_key,
        study_uid,
    )


async def check_deletion(
    conn: asyncpg.Connection, partition_key: int, study_uid: str, policy: RetentionPolicy, now: datetime
) -> None:
    """Raise DeletionRefused when the study (or any of its series and instances) must be kept at `now`."""
    since = await held_since(conn, partition_key, study_uid)
    if since is not None:
        raise DeletionRefused(
            f"study {study_uid} is under legal hold since {since.isoformat()}: remove the hold to delete it"
        )
    first = await first_ingest(conn, partition_key, study_uid)
    if first is None:
        return  # nothing indexed: the delete finds nothing (404)
    until = minimum_retention_until(first, policy)
    if until is not None and now < until:
        raise DeletionRefused(
            f"study {study_uid} is under minimum retention of {policy.minimum_retention_days} days from its "
            f"first ingest ({first.isoformat()}): it may be deleted from {until.isoformat()}"
        )
