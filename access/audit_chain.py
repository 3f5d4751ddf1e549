"""Tamper evidence for the audit log: each record's hash covers its content and the previous record's hash.

`chain_hash = SHA-256(previous chain_hash || canonical(record))`, the first chained record starting from 32
zero bytes. A record changed, removed or inserted afterwards (which takes dropping the append-only trigger,
i.e. the database owner's rights) breaks the chain at that record or at the one after it, and `verify` names
the first such record. Removing records from the end leaves a shorter chain that still verifies: keep the
head that `verify` prints somewhere else (a ticket, a log host) to notice that.

The chain is linear across processes: a writer appends its batch under a transaction-level advisory lock and
chains from the last row, so batches of several processes follow one another, never interleave (identity
values increase with the lock held; the lock is released only after the commit is visible).

Records stored before the chain existed (migration 0019) have no hash; verify counts them and starts after.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import orjson

# the audit writers of every process take it (pg_advisory_xact_lock) to append
CHAIN_LOCK = 4406
GENESIS = bytes(32)


def canonical(row: Sequence[object]) -> bytes:
    """The bytes a record's hash covers: its columns (access.audit.COLUMNS order) as PostgreSQL stores
    them, so that a record read back hashes the same: times in UTC with microseconds, duration_ms as the
    float4 it is stored as."""
    values = []
    for value in row:
        if isinstance(value, datetime):  # a naive time is UTC, as asyncpg stores it
            value = (value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
        elif isinstance(value, float):
            value = struct.unpack("f", struct.pack("f", value))[0]
        values.append(value)
    return orjson.dumps(values)


def link(previous: bytes, row: Sequence[object]) -> bytes:
    return hashlib.sha256(previous + canonical(row)).digest()


async def chain_head(conn: asyncpg.Connection) -> bytes:
    """The hash to chain the next record from (take CHAIN_LOCK first)."""
    last = await conn.fetchval("SELECT chain_hash FROM audit_event ORDER BY event_id DESC LIMIT 1")
    return GENESIS if last is None else bytes(last)


def chained(previous: bytes, rows: list[tuple[object, ...]]) -> list[tuple[object, ...]]:
    """The rows with their chain hashes appended, in order."""
    out = []
    for row in rows:
        previous = link(previous, row)
        out.append((*row, previous))
    return out


@dataclass(slots=True)
class Verdict:
    records: int = 0  # chained records checked
    before_chain: int = 0  # records stored before the chain began (no hash)
    head_id: int | None = None
    head_hash: bytes | None = None
    broken_id: int | None = None  # the first record whose hash does not follow
    reason: str = ""

    @property
    def intact(self) -> bool:
        return self.broken_id is None


async def verify(conn: asyncpg.Connection, columns: list[str], *, batch: int = 5000) -> Verdict:
    """Walk every record in event_id order, recompute the chain, stop at the first record that breaks it."""
    verdict = Verdict()
    previous: bytes | None = None  # None until the first chained record
    sql = f"SELECT event_id, chain_hash, {', '.join(columns)} FROM audit_event ORDER BY event_id"
    async with conn.transaction(readonly=True, isolation="repeatable_read"):
        async for row in conn.cursor(sql, prefetch=batch):
            stored = row["chain_hash"]
            if stored is None:
                if previous is None:
                    verdict.before_chain += 1
                    continue
                verdict.broken_id, verdict.reason = row["event_id"], "it has no chain hash"
                return verdict
            expected = link(GENESIS if previous is None else previous, tuple(row)[2:])
            if bytes(stored) != expected:
                verdict.broken_id = row["event_id"]
                verdict.reason = (
                    "its content or the record before it was changed, or a record before it was removed"
                )
                return verdict
            previous = expected
            verdict.records += 1
            verdict.head_id, verdict.head_hash = row["event_id"], expected
    return verdict
