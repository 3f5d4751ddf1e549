"""What retention means for one study now: GET /studies/{study}/retention."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import asyncpg

from retention.guard import minimum_retention_until
from retention.policy import get_policy


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


async def study_retention(
    conn: asyncpg.Connection, partition_key: int, study_uid: str
) -> dict[str, Any] | None:
    """The study's hold, the dates its policy gives it, and its pending delayed deletion; None when the
    study is neither indexed, nor held, nor in a restore window.

    `expiresAt` is when the expiry sweep may delete it (it runs periodically, so shortly after);
    `deletionScheduledAt` is the end of the restore window of its deleted instances (the earliest, when
    parts were deleted at different times); `deletedInstances` counts those instances."""
    row = await conn.fetchrow(
        """SELECT (SELECT created_at FROM study
                   WHERE partition_key = $1 AND study_instance_uid = $2) AS first,
                  h.held_since, h.held_by, h.reason,
                  (SELECT min(purge_after) FROM deleted_object
                   WHERE partition_key = $1 AND study_instance_uid = $2) AS purge_after,
                  (SELECT count(*) FROM deleted_object
                   WHERE partition_key = $1 AND study_instance_uid = $2 AND NOT original) AS deleted
           FROM (SELECT 1) one
           LEFT JOIN legal_hold h ON h.partition_key = $1 AND h.study_instance_uid = $2""",
        partition_key,
        study_uid,
    )
    first, since = row["first"], row["held_since"]
    if first is None and since is None and row["purge_after"] is None:
        return None
    policy = await get_policy(conn, partition_key)
    expires = None
    if first is not None and policy.expire_after_days is not None:
        expires = first + timedelta(days=policy.expire_after_days)
    return {
        "studyInstanceUID": study_uid,
        "legalHold": since is not None,
        "heldSince": _iso(since),
        "heldBy": row["held_by"],
        "holdReason": row["reason"],
        "firstIngestedAt": _iso(first),
        "minimumRetentionUntil": _iso(minimum_retention_until(first, policy)) if first is not None else None,
        "expiresAt": _iso(expires),
        "deletionScheduledAt": _iso(row["purge_after"]),
        "deletedInstances": row["deleted"],
        "policy": policy.as_json(),
    }
