"""Ordered SQL migrations (indexer/migrations/NNNN_name.sql), applied at start and by `dicomweb migrate`.

Several processes may start at once against one database: a transaction-scoped advisory lock serialises
them, and each file is applied in its own transaction together with its row in schema_migrations, so a
migration is applied exactly once or not at all.
"""

from __future__ import annotations

import re
from importlib import resources

import asyncpg

# Arbitrary but fixed: the advisory lock key that serialises migrators of one database.
_LOCK_KEY = 0x44434D57_4D494752 & 0x7FFFFFFFFFFFFFFF
_NAME_RE = re.compile(r"(\d{4})_[a-z0-9_]+\.sql")


def available_migrations() -> list[tuple[int, str, str]]:
    """(version, file name, SQL) of every migration shipped with the package, in order."""
    found = []
    for entry in resources.files("indexer.migrations").iterdir():
        m = _NAME_RE.fullmatch(entry.name)
        if m:
            found.append((int(m.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [v for v, _, _ in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions: {versions}")
    return found


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply pending migrations; returns the names applied by this call."""
    async with conn.transaction():
        # under the lock: concurrent CREATE TABLE IF NOT EXISTS can still collide in the catalog
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
    applied: list[str] = []
    for version, name, sql in available_migrations():
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
            done = await conn.fetchval("SELECT 1 FROM schema_migrations WHERE version = $1", version)
            if done:
                continue
            await conn.execute(sql)
            await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name)
            applied.append(name)
    return applied
