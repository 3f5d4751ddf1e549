"""A partition's retention policy: the JSON resource, its validation, and its row (retention_policy)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

# a century: longer spans are typing mistakes, and keep date arithmetic far from datetime's year 9999
MAX_DAYS = 36_500
FIELDS = ("minimumRetentionDays", "expireAfterDays", "deleteDelayDays")


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """None: no minimum / no expiry. The default (no row) keeps nothing and deletes at once."""

    minimum_retention_days: int | None = None
    expire_after_days: int | None = None
    delete_delay_days: int = 0

    def as_json(self) -> dict[str, int | None]:
        return {
            "minimumRetentionDays": self.minimum_retention_days,
            "expireAfterDays": self.expire_after_days,
            "deleteDelayDays": self.delete_delay_days,
        }


class PolicyError(ValueError):
    """The body is not a valid policy; the message says why (answered as 400)."""


def _days(body: dict[str, Any], name: str, *, nullable: bool, minimum: int) -> int | None:
    value = body.get(name)
    if value is None:
        if nullable:
            return None
        return 0
    # bool is an int in Python; true is not a number of days
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_DAYS:
        what = "null or " if nullable else ""
        raise PolicyError(f"{name} must be {what}an integer from {minimum} to {MAX_DAYS}, not {value!r}")
    return value


def parse_policy(body: Any) -> RetentionPolicy:
    """A policy from a PUT body: every field optional (missing is null, or 0 for deleteDelayDays), no
    others; an expiry shorter than the minimum could never run and is refused."""
    if not isinstance(body, dict):
        raise PolicyError("the body must be a JSON object")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise PolicyError(f"unknown fields {unknown}: a policy has {', '.join(FIELDS)}")
    policy = RetentionPolicy(
        _days(body, "minimumRetentionDays", nullable=True, minimum=1),
        _days(body, "expireAfterDays", nullable=True, minimum=1),
        _days(body, "deleteDelayDays", nullable=False, minimum=0) or 0,
    )
    low, high = policy.minimum_retention_days, policy.expire_after_days
    if low is not None and high is not None and high < low:
        raise PolicyError(f"expireAfterDays ({high}) is shorter than minimumRetentionDays ({low})")
    return policy


async def get_policy(conn: asyncpg.Connection | asyncpg.Pool, partition_key: int) -> RetentionPolicy:
    row = await conn.fetchrow(
        """SELECT minimum_retention_days, expire_after_days, delete_delay_days
           FROM retention_policy WHERE partition_key = $1""",
        partition_key,
    )
    return RetentionPolicy(*row) if row is not None else RetentionPolicy()


async def set_policy(
    conn: asyncpg.Connection | asyncpg.Pool, partition_key: int, policy: RetentionPolicy
) -> None:
    await conn.execute(
        """INSERT INTO retention_policy (partition_key, minimum_retention_days, expire_after_days,
               delete_delay_days) VALUES ($1, $2, $3, $4)
           ON CONFLICT (partition_key) DO UPDATE SET minimum_retention_days = $2, expire_after_days = $3,
               delete_delay_days = $4, updated_at = now()""",
        partition_key,
        policy.minimum_retention_days,
        policy.expire_after_days,
        policy.delete_delay_days,
    )


async def clear_policy(conn: asyncpg.Connection | asyncpg.Pool, partition_key: int) -> bool:
    """Back to the default; False when the partition had no policy."""
    return (
        await conn.fetchval(
            "DELETE FROM retention_policy WHERE partition_key = $1 RETURNING true", partition_key
        )
        is not None
    )


async def partitions_with_policy(conn: asyncpg.Connection) -> list[tuple[int, RetentionPolicy]]:
    rows = await conn.fetch(
        """SELECT partition_key, minimum_retention_days, expire_after_days, delete_delay_days
           FROM retention_policy ORDER BY partition_key"""
    )
    return [(r[0], RetentionPolicy(r[1], r[2], r[3])) for r in rows]
