"""The audit log's hash chain: linear across processes writing at once, verified end to end, and broken
exactly at the record that was changed, removed after, or slipped in."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone

import asyncpg
import pytest

from access import audit_chain
from access.audit import COLUMNS, AuditLog, system_event
from dicomweb.cli import main


def event(n: int, when: datetime | None = None) -> object:
    return system_event(
        "scrub", "SCRUB", f"/record/{n}", 200, 0, f"record {n} ünïcode", when or datetime.now(UTC),
        study=f"1.2.{n}",
    )  # fmt: skip


async def verify(pool: asyncpg.Pool) -> audit_chain.Verdict:
    async with pool.acquire() as conn:
        return await audit_chain.verify(conn, COLUMNS, batch=7)


async def ids(pool: asyncpg.Pool) -> list[int]:
    return [r[0] for r in await pool.fetch("SELECT event_id FROM audit_event ORDER BY event_id")]


async def tamper(pool: asyncpg.Pool, sql: str, *args: object) -> None:
    """What it takes to rewrite history: the owner's right to disable the append-only trigger."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("ALTER TABLE audit_event DISABLE TRIGGER audit_event_append_only")
        await conn.execute(sql, *args)
        await conn.execute("ALTER TABLE audit_event ENABLE TRIGGER audit_event_append_only")


async def test_writers_of_several_processes_make_one_chain(pool: asyncpg.Pool, database_url: str) -> None:
    pools = [await asyncpg.create_pool(database_url, min_size=1, max_size=2) for _ in range(3)]
    try:
        logs = [AuditLog(p) for p in pools]

        async def write(log: AuditLog, offset: int) -> None:
            for batch in range(10):
                for n in range(7):
                    # odd durations and zones: the stored float4 and UTC time must hash as written
                    e = event(offset + batch * 10 + n, datetime.now(timezone(timedelta(hours=-5))))
                    e.duration_ms = 0.1 + n / 3
                    log.record(e)
                await log.flush()

        await asyncio.gather(*(write(log, 1000 * k) for k, log in enumerate(logs)))
    finally:
        for p in pools:
            await p.close()
    verdict = await verify(pool)
    assert verdict.intact and verdict.records == 210 and verdict.before_chain == 0
    assert verdict.head_id == max(await ids(pool))
    head = await pool.fetchval("SELECT chain_hash FROM audit_event ORDER BY event_id DESC LIMIT 1")
    assert verdict.head_hash == head


async def test_tampering_is_found_at_the_exact_record(
    pool: asyncpg.Pool, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    log = AuditLog(pool)
    # records from before the chain existed (as after migration 0019 on a running archive)
    await pool.copy_records_to_table(
        "audit_event",
        records=[tuple(getattr(event(n), c) for c in COLUMNS) for n in range(3)],
        columns=COLUMNS,
    )
    for n in range(20):
        log.record(event(n))
        if n % 6 == 5:
            await log.flush()
    await log.flush()
    all_ids = await ids(pool)
    verdict = await verify(pool)
    assert verdict.intact and verdict.records == 20 and verdict.before_chain == 3
    cli = ["audit", "verify", "--database-url", database_url]
    assert await asyncio.to_thread(main, cli) == 0
    assert "intact: 20 records (3 records from before" in capsys.readouterr().out

    changed = all_ids[10]
    await tamper(pool, "UPDATE audit_event SET detail = 'nothing to see' WHERE event_id = $1", changed)
    verdict = await verify(pool)
    assert verdict.broken_id == changed and verdict.records == 7
    assert await asyncio.to_thread(main, cli) == 1
    assert f"broken at record {changed}:" in capsys.readouterr().err
    await tamper(pool, "UPDATE audit_event SET detail = 'record 7 ünïcode' WHERE event_id = $1", changed)
    assert (await verify(pool)).intact  # put back exactly as it was

    removed = all_ids[15]
    await tamper(pool, "DELETE FROM audit_event WHERE event_id = $1", removed)
    assert (await verify(pool)).broken_id == all_ids[16]  # the record after the gap no longer follows

    await tamper(pool, "DELETE FROM audit_event WHERE event_id >= $1", all_ids[16])
    assert (await verify(pool)).intact  # a cut tail still verifies: compare the head kept elsewhere
    forged = tuple(getattr(event(99), c) for c in COLUMNS)
    await pool.copy_records_to_table("audit_event", records=[forged], columns=COLUMNS)
    verdict = await verify(pool)
    assert verdict.broken_id == max(await ids(pool)) and "no chain hash" in verdict.reason


async def test_text_postgresql_cannot_hold_is_stored_replaced_not_retried_forever(pool: asyncpg.Pool) -> None:
    """A request path with `%00` (or an HL7 field with a NUL) made the batch's COPY fail on every attempt:
    the writer retried it forever and no later record of the process was written."""
    log = AuditLog(pool)
    before, nul, after = event(1), event(2), event(3)
    nul.path, nul.user_agent = "/v2/studies/1.2\x00.3/metadata", "MSH-10 \x00"  # type: ignore[attr-defined]
    nul.roles = ["reader\x00"]  # type: ignore[attr-defined]
    for record in (before, nul, after):
        log.record(record)
    assert await log.flush() == 3
    rows = await pool.fetch("SELECT path, user_agent, roles FROM audit_event ORDER BY event_id")
    assert [tuple(r) for r in rows] == [
        ("/record/1", None, []),
        ("/v2/studies/1.2\ufffd.3/metadata", "MSH-10 \ufffd", ["reader\ufffd"]),
        ("/record/3", None, []),
    ]
    log.record(event(4))  # and the writer goes on
    assert await log.flush() == 1
    verdict = await verify(pool)
    assert verdict.intact and verdict.records == 4
