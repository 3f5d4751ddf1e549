"""The audit log: one record per request (IHE ATNA's who, what, when, from where, outcome), append-only.

Requests never wait for the database: a record goes into an in-process buffer, and a background task
writes the buffer with one COPY every FLUSH_SECONDS, and once more at shutdown. The cost of that is a
window: if the process is killed (SIGKILL, power loss), the records of at most the last FLUSH_SECONDS of
requests are lost; a graceful stop (SIGTERM) loses nothing. If PostgreSQL is unavailable the buffer is kept
and retried, up to MAX_BUFFERED records; beyond that the oldest are dropped and the count logged.

Each record carries a hash chained to the record before it (access/audit_chain.py: tamper evidence,
`dicomweb audit verify`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields
from datetime import datetime

import asyncpg

from access.audit_chain import CHAIN_LOCK, chain_head, chained
from indexer.background import Periodic

log = logging.getLogger(__name__)

FLUSH_SECONDS = 0.1
MAX_BUFFERED = 100_000


@dataclass(slots=True)
class AuditEvent:
    event_time: datetime
    subject: str
    auth: str
    token_id: str | None
    token_name: str | None
    roles: list[str]
    client_address: str | None
    user_agent: str | None
    method: str
    path: str
    query: str | None
    action: str
    action_code: str
    partition_name: str | None
    study_uid: str | None
    series_uid: str | None
    instance_uid: str | None
    status: int
    outcome: int
    detail: str | None
    duration_ms: float


COLUMNS = [f.name for f in fields(AuditEvent)]
# a shallow row in column order: dataclasses.astuple deep-copies every field, ~0.1 ms a request
_ROW = operator.attrgetter(*COLUMNS)
_CHAINED = [*COLUMNS, "chain_hash"]


def system_event(
    action: str,
    method: str,
    path: str,
    status: int,
    outcome: int,
    detail: str,
    when: datetime,
    *,
    partition: str | None = None,
    study: str | None = None,
    series: str | None = None,
    instance: str | None = None,
) -> AuditEvent:
    """A record of something the archive itself did or found (a scrub's findings): subject `system`."""
    return AuditEvent(
        event_time=when, subject="system", auth="system", token_id=None, token_name=None, roles=[],
        client_address=None, user_agent=None, method=method, path=path, query=None, action=action,
        action_code="E", partition_name=partition, study_uid=study, series_uid=series, instance_uid=instance,
        status=status, outcome=outcome, detail=detail, duration_ms=0.0,
    )  # fmt: skip


def outcome_of(status: int) -> int:
    """ATNA EventOutcomeIndicator: 0 success, 4 minor failure (refused, bad request), 8 serious failure."""
    return 0 if status < 400 else 4 if status < 500 else 8


class AuditLog(Periodic):
    def __init__(self, pool: asyncpg.Pool, flush_seconds: float = FLUSH_SECONDS) -> None:
        super().__init__(
            "audit-writer",
            self._write,
            flush_seconds,
            lambda exc: log.warning("audit records not written yet (%s); retrying", exc),
        )
        self.pool = pool
        self._buffer: list[tuple[object, ...]] = []
        self._flushing = asyncio.Lock()

    def record(self, event: AuditEvent) -> None:
        """Queue a record (no I/O: safe to call at the end of any request)."""
        self._buffer.append(_ROW(event))
        if len(self._buffer) > MAX_BUFFERED:
            dropped = len(self._buffer) - MAX_BUFFERED
            del self._buffer[:dropped]
            log.error("audit buffer full: %d records dropped", dropped)

    async def stop(self) -> None:
        await super().stop()
        with contextlib.suppress(Exception):
            await self.flush()

    async def _write(self) -> None:
        await self.flush()  # not its count, which would mean "run again at once": records batch per interval

    async def flush(self) -> int:
        async with self._flushing:
            batch, self._buffer = self._buffer, []
            if not batch:
                return 0
            try:
                try:
                    await self._copy(batch)
                except asyncpg.CharacterNotInRepertoireError:
                    # a NUL in a record (a request path with %00, an HL7 field) fails the whole COPY on
                    # every attempt: stored replaced, so that one request cannot stop the audit log
                    batch = [_storable(row) for row in batch]
                    await self._copy(batch)
            except BaseException:
                self._buffer[:0] = batch  # keep them, in order, for the next attempt
                raise
            return len(batch)

    async def _copy(self, batch: list[tuple[object, ...]]) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            # one batch at a time across processes, chained from the last record (audit_chain)
            await conn.execute("SELECT pg_advisory_xact_lock($1)", CHAIN_LOCK)
            records = chained(await chain_head(conn), batch)
            await conn.copy_records_to_table("audit_event", records=records, columns=_CHAINED)


def _storable(row: tuple[object, ...]) -> tuple[object, ...]:
    """A record without NUL characters, which PostgreSQL text cannot hold (each becomes U+FFFD)."""

    def clean(value: object) -> object:
        if isinstance(value, str):
            return value.replace("\x00", "\ufffd")
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return tuple(clean(value) for value in row)


@dataclass(frozen=True, slots=True)
class AuditQuery:
    subject: str | None = None
    start: datetime | None = None
    end: datetime | None = None
    action: str | None = None
    limit: int | None = 100
    offset: int = 0

    def sql(self) -> tuple[str, list[object]]:
        conditions, args = [], []
        for column, op, value in (
            ("subject", "=", _storable((self.subject,))[0]), ("event_time", ">=", self.start),
            ("event_time", "<", self.end), ("action", "=", self.action),
        ):  # fmt: skip
            if value is not None:
                args.append(value)
                conditions.append(f"{column} {op} ${len(args)}")
        where = (" WHERE " + " AND ".join(conditions)) if conditions else ""
        sql = f"SELECT event_id, {', '.join(COLUMNS)} FROM audit_event{where} ORDER BY event_id"
        if self.limit is not None:
            sql += f" LIMIT {int(self.limit)}"
        if self.offset:
            sql += f" OFFSET {int(self.offset)}"
        return sql, args


def as_json(row: asyncpg.Record) -> dict[str, object]:
    out = dict(row)
    out["event_time"] = row["event_time"].isoformat()
    return out


async def query(pool: asyncpg.Pool, q: AuditQuery) -> list[dict[str, object]]:
    sql, args = q.sql()
    return [as_json(r) for r in await pool.fetch(sql, *args)]


async def stream(conn: asyncpg.Connection, q: AuditQuery) -> AsyncIterator[dict[str, object]]:
    """Every matching record through a server-side cursor (exports of any size in constant memory)."""
    sql, args = q.sql()
    async with conn.transaction(readonly=True):
        async for row in conn.cursor(sql, *args, prefetch=500):
            yield as_json(row)
