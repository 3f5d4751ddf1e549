"""The retention sweep audits what its steps committed, never a step rolled back (Step.after_commit)."""

from __future__ import annotations

import datetime as dt

import asyncpg

from indexer.operations import OperationRunner, create_operation
from indexer.writes import Outcome
from retention.policy import RetentionPolicy, set_policy
from retention.sweep import RETENTION_SWEEP, RetentionSweepHandler
from tests.test_index_writes import attrs, index, new_partition


async def test_a_failed_sweep_step_audits_nothing_and_its_retry_audits_once(pool: asyncpg.Pool) -> None:
    """The retention sweep's audit records leave with the step's commit (Step.after_commit): a step rolled
    back after deleting a study reports nothing, and the step done again reports the expiry once."""
    async with pool.acquire() as conn:
        partition = await new_partition(conn)
        await set_policy(conn, partition, RetentionPolicy(expire_after_days=1))
    assert await index(pool, partition, [attrs("7.1", "7.1.1", "7.1.1.1")]) == [Outcome.CREATED]
    await pool.execute(
        "UPDATE study SET created_at = now() - interval '3 days' WHERE partition_key = $1", partition
    )
    reported: list[object] = []
    sweep = RetentionSweepHandler(lambda: dt.datetime.now(dt.UTC), reported.append)

    class FailsOnce:
        failed = False

        async def step(self, conn: asyncpg.Connection, op: object) -> object:
            step = await sweep.step(conn, op)  # type: ignore[arg-type]
            if not FailsOnce.failed and step.checkpoint.get("expired"):
                FailsOnce.failed = True
                raise RuntimeError("the step fails after its deletions")
            return step

    async with pool.acquire() as conn:
        await create_operation(conn, RETENTION_SWEEP, {}, [])
    runner = OperationRunner(pool, {RETENTION_SWEEP: FailsOnce()})
    while await runner.run_once():
        pass
    assert FailsOnce.failed and reported == []  # rolled back: the study is there, nothing audited
    assert await pool.fetchval("SELECT count(*) FROM study WHERE partition_key = $1", partition) == 1
    await pool.execute("UPDATE operation SET leased_until = now() WHERE status = 'running'")
    while await runner.run_once():
        pass
    assert await pool.fetchval("SELECT count(*) FROM study WHERE partition_key = $1", partition) == 0
    assert [(e.study_uid, e.status) for e in reported] == [("7.1", 204)], reported  # type: ignore[attr-defined]
